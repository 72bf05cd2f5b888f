-- Centroid-neighbour pairs (both directions) the bandit shares rewards along.
-- Grain: neighbour pair.
select cluster, neighbor, distance
from cluster_neighbors
where key = $key
order by cluster, neighbor;
