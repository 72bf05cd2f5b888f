-- Load one shard's keys (the registered frame `batch`: doc_idx, n_words, buckets).
-- Grain: one row per pool document of the shard.
insert into dedup_buckets (key, doc_idx, n_words, buckets)
select $key, doc_idx, n_words, buckets from batch
