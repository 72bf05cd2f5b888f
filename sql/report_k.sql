-- The number of clusters k of the cluster partition (clusters may be empty, so not count(distinct)).
-- grain: at most one row (cluster_info)
select max(k) as k from cluster_info where key = $clusters_key;
