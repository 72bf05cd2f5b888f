-- Remove a dedup partition's dropped documents and info rows before they are rewritten (idempotent).
-- Grain: partition (key). dedup_buckets stays, its shards are recorded in shard_done.
delete from dedup_duplicates where key = $key;
delete from dedup_info where key = $key;
