-- Remove one cluster partition's tables before they are rewritten (delete-then-insert on key); its assignments
-- are parts, recorded in the shard ledger.
-- Grain: every row of the partition $key in each cluster table.
delete from cluster_centroids where key = $key;
delete from cluster_neighbors where key = $key;
delete from cluster_info where key = $key;
