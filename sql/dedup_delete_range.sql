-- Remove one shard's keys before loading it (a shard is never counted twice).
-- Grain: every dedup_buckets row of key $key with $lo <= doc_idx < $hi.
delete from dedup_buckets where key = $key and doc_idx >= $lo and doc_idx < $hi
