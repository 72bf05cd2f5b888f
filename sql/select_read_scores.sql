-- One pool-wide scorer's score (default: combined) of every pool document of a score partition (higher is better).
-- Grain: pool document, ordered by doc_idx.
select doc_idx, score
from score_docs
where key = $key and scorer = $scorer
order by doc_idx;
