-- Neighbour radius gamma of a cluster partition.
-- Grain: partition (one row).
select gamma
from cluster_info
where key = $key;
