-- Texts of one role of an ingest partition, in doc_idx order, for featurization.
-- Grain: one row per document (doc_idx dense 0..n-1).
select doc_idx, text
from ingest_docs
where key = $key and role = $role
order by doc_idx
