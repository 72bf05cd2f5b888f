-- Record the resolved settings and fit statistics of a featurize partition.
-- Grain: one row per key.
insert into featurize_info
    (key, version, n_features, dsir_buckets, dim, max_chars, svd_docs, explained_variance, pool_docs, target_docs)
values
    ($key, $version, $n_features, $dsir_buckets, $dim, $max_chars, $svd_docs, $explained_variance, $pool_docs, $target_docs)
