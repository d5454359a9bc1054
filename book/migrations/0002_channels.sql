-- The payment channel records kept beside the ledger in Redis (docs/book.md, "Payment
-- channels"): without them a Redis data loss would forget how much of each channel was
-- already credited. One row per channel, replaced only by a higher version (every commit in
-- Redis raises it), so two writers racing never put an older record back.
CREATE TABLE IF NOT EXISTS book_channels (
    prefix    TEXT        NOT NULL,
    id        TEXT        NOT NULL,
    version   BIGINT      NOT NULL CHECK (version > 0),
    -- The record's JSON exactly as Redis held it (a rebuild writes these bytes back).
    record    TEXT        NOT NULL,
    booked_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (prefix, id)
);

-- The small side state, stored whole each round: credits decided with a channel update and not
-- yet in the ledger (pending, poisoned), channels with a forced close to watch, the close
-- watcher's cursor. `taken_us` is the Redis clock of the snapshot: a later one replaces it.
CREATE TABLE IF NOT EXISTS book_channel_state (
    prefix    TEXT        PRIMARY KEY,
    taken_us  BIGINT      NOT NULL,
    state     TEXT        NOT NULL,
    booked_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
