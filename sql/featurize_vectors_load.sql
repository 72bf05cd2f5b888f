-- LSA vectors of one role of a featurize partition, in doc_idx order.
-- Grain: one row per document.
select doc_idx, vec
from featurize_vectors
where key = $key and role = $role
order by doc_idx
