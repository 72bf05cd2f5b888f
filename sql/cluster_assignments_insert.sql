-- Write the cluster label and centroid distance of every pool document (registered arrow `batch`).
-- Grain: one row per pool document.
insert into cluster_assignments (key, doc_idx, cluster, distance)
select $key, doc_idx, cluster, distance
from batch
