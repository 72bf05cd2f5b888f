-- Create the featurize info table, and featurize_vectors / featurize_ngrams empty until a partition has parts
-- (then they are views over the parts: featurize_views).
-- Grain: featurize_info one row per key; the views one row per (key, role, doc_idx).
create table if not exists featurize_info (
    key varchar not null,
    version varchar not null,
    n_features integer not null,
    dsir_buckets integer not null,
    dim integer not null,
    max_chars integer not null,
    svd_docs bigint not null,
    explained_variance double not null,
    pool_docs bigint not null,
    target_docs bigint not null
);
create view if not exists featurize_vectors as
select null::varchar as key, null::varchar as role, null::bigint as doc_idx, null::float[] as vec
where false;
create view if not exists featurize_ngrams as
select null::varchar as key, null::varchar as role, null::bigint as doc_idx, null::usmallint[] as buckets,
       null::usmallint[] as counts
where false;
