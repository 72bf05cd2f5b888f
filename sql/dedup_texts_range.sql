-- Texts of one dedup shard (doc_idx range of the pool), exported as the shard's input part.
-- Grain: one row per pool document, lo <= doc_idx < hi, in doc_idx order.
select doc_idx, text
from ingest_docs
where key = $key and role = 'pool' and doc_idx >= $lo and doc_idx < $hi
order by doc_idx
