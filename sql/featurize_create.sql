-- Create the featurize tables: LSA vectors, DSIR-space n-gram counts, one info row per partition.
-- Grain: featurize_vectors/featurize_ngrams one row per (key, role, doc_idx); featurize_info one row per key.
create table if not exists featurize_vectors (
    key varchar not null,
    role varchar not null,
    doc_idx bigint not null,
    vec float[] not null  -- length dim: a list, not float[dim], so partitions of any dim share the table
);
create table if not exists featurize_ngrams (
    key varchar not null,
    role varchar not null,
    doc_idx bigint not null,
    buckets usmallint[] not null,
    counts usmallint[] not null
);
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
