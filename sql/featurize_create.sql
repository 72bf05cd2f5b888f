-- Create the featurize info and n-gram totals tables, and featurize_vectors / featurize_ngrams empty until a
-- partition has parts (then they are views over the parts: featurize_views).
-- Grain: featurize_info one row per key; featurize_totals one row per (key, role, bucket that occurs); the views
-- one row per (key, role, doc_idx).
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
create table if not exists featurize_totals (
    key varchar not null,
    role varchar not null,
    bucket integer not null,
    total bigint not null       -- sum of the role's stored counts in the bucket (what DSIR's p_raw is fitted on)
);
