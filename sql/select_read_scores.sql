-- One pool-wide scorer's score (default: combined) of the pool documents of a score partition with doc_idx in
-- [$lo, $hi) ($hi null: to the end); higher is better.
-- Grain: pool document, ordered by doc_idx.
select doc_idx, score
from score_docs
where key = $key and scorer = $scorer and doc_idx >= $lo and ($hi is null or doc_idx < $hi)
order by doc_idx;
