-- LSA vectors and DSIR-space n-gram counts of every featurize partition, read in place from the shard
-- tasks' Parquet parts ($files: <store>.data/featurize/key=K/role=R/LO-HI.parquet); `key` and `role` come
-- from the paths, so a filter on them skips whole files.
-- Grain: featurize_vectors / featurize_ngrams one row per (key, role, doc_idx).
create or replace view featurize_vectors as
select key, role, doc_idx, vec
from read_parquet($files, hive_partitioning = true, hive_types = {'key': varchar, 'role': varchar});
create or replace view featurize_ngrams as
select key, role, doc_idx, buckets, counts
from read_parquet($files, hive_partitioning = true, hive_types = {'key': varchar, 'role': varchar});
