-- Exact per-bucket totals of the pool's hashed n-gram counts (what DSIR's p_raw is fitted on), streamed.
-- Grain: bucket with at least one occurrence.
select bucket, sum(cnt)::double as total
from (
    select unnest(buckets) as bucket, unnest(counts) as cnt
    from featurize_ngrams
    where key = $key and role = 'pool'
)
group by bucket
