-- Cluster label and centroid distance of every pool document, for every cluster partition, read in place from
-- the pass-2 shard tasks' Parquet parts ($files: <store>.data/cluster/key=K/role=pool/LO-HI.parquet; `key`
-- comes from the path, so a filter on it skips other partitions' files).
-- Grain: one row per (key, doc_idx).
create or replace view cluster_assignments as
select key, doc_idx, cluster, distance
from read_parquet($files, hive_partitioning = true, hive_types = {'key': varchar, 'role': varchar});
