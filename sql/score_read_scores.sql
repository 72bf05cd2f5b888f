-- One scorer's score for every pool document of a score partition, in doc_idx order.
-- Grain: pool document.
select doc_idx, score
from score_docs
where key = $key and scorer = $scorer
order by doc_idx
