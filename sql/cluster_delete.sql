-- Remove one cluster partition before it is rewritten (delete-then-insert on key).
-- Grain: every row of the partition $key in each cluster table.
delete from cluster_assignments where key = $key;
delete from cluster_centroids where key = $key;
delete from cluster_neighbors where key = $key;
delete from cluster_info where key = $key;
