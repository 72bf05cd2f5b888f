-- Centroid-neighbour pairs of a cluster partition, both directions.
-- Grain: one row per directed pair.
select cluster, neighbor, distance
from cluster_neighbors
where key = $key
order by cluster, neighbor
