-- Write every cluster's size and normalized centroid (registered arrow `batch`).
-- Grain: one row per cluster, empty ones included.
insert into cluster_centroids (key, cluster, size, vec)
select $key, cluster, size, vec::float[]
from batch
