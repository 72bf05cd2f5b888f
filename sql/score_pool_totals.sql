-- Exact per-bucket totals of the pool's hashed n-gram counts (what DSIR's p_raw is fitted on), as the featurize
-- shard tasks summed them.
-- Grain: bucket with at least one occurrence.
select bucket, total::double as total
from featurize_totals
where key = $key and role = 'pool'
