-- Cluster label of every pool document of a cluster partition, in doc_idx order.
-- Grain: one row per pool document.
select doc_idx, cluster
from cluster_assignments
where key = $key
order by doc_idx
