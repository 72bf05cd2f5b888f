-- Cluster label of the pool documents of a cluster partition with doc_idx in [$lo, $hi) ($hi null: to the end).
-- Grain: pool document, ordered by doc_idx.
select doc_idx, cluster
from cluster_assignments
where key = $key and doc_idx >= $lo and ($hi is null or doc_idx < $hi)
order by doc_idx;
