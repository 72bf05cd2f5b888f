-- Pool documents without any hashed n-gram (DSIR scores them 0).
-- Grain: one row (the count).
select count(*)
from featurize_ngrams
where key = $key and role = 'pool' and len(buckets) = 0
