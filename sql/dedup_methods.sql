-- How many pool documents each matcher covered: one-word-edit keys, MinHash bands, or neither (too short).
-- Grain: one row per matcher (name, docs); a document in the overlap counts under both.
select 'docs_one_edit' as name, count(*) filter (where n_words >= $min_words and n_words <= $short_words) as docs
from dedup_buckets where key = $key
union all
select 'docs_minhash', count(*) filter (where n_words >= $lo_minhash) from dedup_buckets where key = $key
union all
select 'docs_too_short', count(*) filter (where n_words < $min_words) from dedup_buckets where key = $key
