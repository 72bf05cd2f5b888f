-- Write the centroid-neighbour pairs closer than gamma (registered arrow `batch`).
-- Grain: one row per directed pair (both directions present, no self pairs).
insert into cluster_neighbors (key, cluster, neighbor, distance)
select $key, cluster, neighbor, distance
from batch
