-- Token counts of the k-means fit sample (registered arrow `picked`: doc_idx) of an ingest partition's pool.
-- Grain: one row per sampled pool document, in any order (the reader places rows by doc_idx).
select d.doc_idx, d.n_tokens
from ingest_docs d
semi join picked p on d.doc_idx = p.doc_idx
where d.key = $key and d.role = 'pool'
