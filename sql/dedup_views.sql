-- Each pool document's LSH / one-word-edit keys for every dedup partition, read in place from the shard tasks'
-- Parquet parts ($files: <store>.data/dedup/key=K/role=pool/LO-HI.parquet; `key` comes from the path).
-- Grain: one row per (key, doc_idx).
create or replace view dedup_buckets as
select key, doc_idx, n_words, buckets
from read_parquet($files, hive_partitioning = true, hive_types = {'key': varchar, 'role': varchar});
