-- Cluster label of every pool document of a cluster partition.
-- Grain: pool document, ordered by doc_idx.
select doc_idx, cluster
from cluster_assignments
where key = $key
order by doc_idx;
