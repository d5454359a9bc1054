-- The book of record: one row per ledger line, keyed by the ledger it came from (the Redis key
-- prefix of a deployment), the idempotency key that made the money move once, and the account
-- it moved on (a settle batch moves money on several accounts under one key).
CREATE TABLE IF NOT EXISTS book_entries (
    prefix       TEXT        NOT NULL,
    key          TEXT        NOT NULL,
    account      TEXT        NOT NULL,
    kind         TEXT        NOT NULL,
    -- pico-dollars; the ledger's amounts are i64, so BIGINT holds every one of them.
    amount       BIGINT      NOT NULL,
    requests     BIGINT      NOT NULL CHECK (requests >= 0),
    cpu_us       BIGINT      NOT NULL CHECK (cpu_us >= 0),
    deploys      BIGINT      NOT NULL CHECK (deploys >= 0),
    rows_read    BIGINT      NOT NULL CHECK (rows_read >= 0),
    rows_written BIGINT      NOT NULL CHECK (rows_written >= 0),
    -- Where it was read from: the Redis stream entry id `<ms>-<seq>`, as two numbers so that
    -- ranges of the stream can be compared with the book.
    stream_ms    BIGINT      NOT NULL,
    stream_seq   BIGINT      NOT NULL,
    booked_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (prefix, key, account)
);
CREATE INDEX IF NOT EXISTS book_entries_account ON book_entries (prefix, account);
CREATE INDEX IF NOT EXISTS book_entries_stream ON book_entries (prefix, stream_ms, stream_seq);

-- A ledger line whose idempotency key the book already holds with other content: never a
-- retry (those are identical), so the Redis ledger was reset under the book (a data loss whose
-- epochs restarted). Kept here for an operator; the book's first row stays as it was.
CREATE TABLE IF NOT EXISTS book_conflicts (
    prefix      TEXT        NOT NULL,
    stream_ms   BIGINT      NOT NULL,
    stream_seq  BIGINT      NOT NULL,
    key         TEXT        NOT NULL,
    account     TEXT        NOT NULL,
    kind        TEXT        NOT NULL,
    amount      BIGINT      NOT NULL,
    seen_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (prefix, stream_ms, stream_seq, key, account)
);

-- How far the writer has copied each ledger stream (one per Redis key prefix). Moved in the
-- same transaction as the rows it covers.
CREATE TABLE IF NOT EXISTS book_cursor (
    prefix  TEXT PRIMARY KEY,
    last_id TEXT NOT NULL
);
