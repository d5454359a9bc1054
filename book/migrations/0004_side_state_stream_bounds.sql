-- On a Redis Cluster the side state is cut before each shard's stream end is read, so one
-- position cannot bound it: each stream's cursor when the round began is stored instead (a
-- JSON object, stream prefix -> "<ms>-<seq>"). A rebuild holds again the reversal of every
-- start charged in a stream after its bound (a superset of those after the cut).
ALTER TABLE book_channel_state ADD COLUMN IF NOT EXISTS stream_bounds TEXT;
