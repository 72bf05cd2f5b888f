-- Token count of the pool documents of an ingest partition with doc_idx in [$lo, $hi) ($hi null: to the end), the budget's unit.
-- Grain: pool document, ordered by doc_idx.
select doc_idx, n_tokens
from ingest_docs
where key = $key and role = 'pool' and doc_idx >= $lo and ($hi is null or doc_idx < $hi)
order by doc_idx;
