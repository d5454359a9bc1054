-- The channel side state is stored by a round that copied every ledger line up to its
-- snapshot's last entry (`bound`), and replaces only a state cut at an earlier entry (or the
-- same entry, read earlier): two writers never put an older one back.
ALTER TABLE book_channel_state ADD COLUMN IF NOT EXISTS bound_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE book_channel_state ADD COLUMN IF NOT EXISTS bound_seq BIGINT NOT NULL DEFAULT 0;
