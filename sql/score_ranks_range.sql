-- One scorer's percentile ranks for the documents lo <= doc_idx < hi (a chunk of the combined score).
-- Grain: one row per document, in doc_idx order.
select doc_idx, coalesce(pct, 0.5) as pct
from score_ranks
where scorer = $scorer and doc_idx >= $lo and doc_idx < $hi
order by doc_idx
