-- Pool vectors of one streamed batch: the doc_idx range [$lo, $hi) of a featurize partition.
-- Grain: one row per pool document of the range, in any order (the reader places rows by doc_idx).
select doc_idx, vec
from featurize_vectors
where key = $key and role = 'pool' and doc_idx >= $lo and doc_idx < $hi
