-- Record the resolved k, the gamma used and the k-means inertia of a cluster partition.
-- Grain: one row per key.
insert into cluster_info (key, k, gamma, inertia)
values ($key, $k, $gamma, $inertia)
