-- Create the cluster tables: centroids, neighbour pairs and one info row per partition; cluster_assignments is
-- empty until a partition has parts (then a view over them: cluster_views).
-- Grain: assignments per pool document, centroids per cluster, neighbors per directed pair, info per key.
create view if not exists cluster_assignments as
select null::varchar as key, null::bigint as doc_idx, null::integer as cluster,
       null::float as distance    -- cosine distance to the cluster's normalized centroid
where false;
create table if not exists cluster_centroids (
    key varchar not null,
    cluster integer not null,     -- dense 0..k-1, empty clusters are kept with size 0
    size bigint not null,
    vec float[] not null          -- L2-normalized, length dim
);
create table if not exists cluster_neighbors (
    key varchar not null,
    cluster integer not null,
    neighbor integer not null,
    distance float not null       -- cosine distance between centroids, < gamma
);
create table if not exists cluster_info (
    key varchar not null,
    k integer not null,
    gamma double not null,
    inertia double not null       -- sum of squared Euclidean distances to the own normalized centroid
);
