-- Append one batch of DSIR-space n-gram counts (registered arrow table `batch`) to a partition.
-- Grain: one row per document of the batch; buckets ascending, counts clipped at 65535.
insert into featurize_ngrams (key, role, doc_idx, buckets, counts)
select $key, $role, doc_idx, buckets, counts
from batch
