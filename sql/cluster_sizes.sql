-- Members per cluster of one cluster partition as written (checked against the centroids' pass-1 sizes).
-- Grain: one row per non-empty cluster.
select cluster, count(*) as members
from cluster_assignments
where key = $key
group by cluster
