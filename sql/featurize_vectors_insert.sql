-- Append one batch of LSA vectors (registered arrow table `batch`) to a featurize partition.
-- Grain: one row per document of the batch.
insert into featurize_vectors (key, role, doc_idx, vec)
select $key, $role, doc_idx, vec::float[]
from batch
