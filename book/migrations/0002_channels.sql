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
-- watcher's cursor. Stored by a round that copied every ledger line up to its snapshot's last
-- entry (`bound`), replacing a state cut at an earlier entry; `taken_us`: the Redis clock then.
CREATE TABLE IF NOT EXISTS book_channel_state (
    prefix    TEXT        PRIMARY KEY,
    taken_us  BIGINT      NOT NULL,
    bound_ms  BIGINT      NOT NULL,
    bound_seq BIGINT      NOT NULL,
    state     TEXT        NOT NULL,
    booked_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
