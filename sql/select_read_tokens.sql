-- Token count of every pool document of an ingest partition, the budget's unit.
-- Grain: pool document, ordered by doc_idx.
select doc_idx, n_tokens
from ingest_docs
where key = $key and role = 'pool'
order by doc_idx;
