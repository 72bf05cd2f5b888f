-- Texts of one shard (doc_idx range) of one role of an ingest partition: the shared input part dedup,
-- featurize and score read (quadflow.shards.export_texts).
-- Grain: one row per document, lo <= doc_idx < hi, in doc_idx order.
select doc_idx, text
from ingest_docs
where key = $key and role = $role and doc_idx >= $lo and doc_idx < $hi
order by doc_idx
