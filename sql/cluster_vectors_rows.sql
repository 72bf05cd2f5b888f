-- Pool vectors of the k-means fit sample (registered arrow `picked`: doc_idx) of a featurize partition.
-- Grain: one row per sampled pool document, in any order (the reader places rows by doc_idx).
select v.doc_idx, v.vec
from featurize_vectors v
semi join picked p on v.doc_idx = p.doc_idx
where v.key = $key and v.role = 'pool'
