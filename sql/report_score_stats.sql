-- Pool documents scored and their mean score, per scorer, over the whole pool (finite scores only).
-- grain: one row per scorer (inputs: score_docs)
select scorer, count(*) as docs, avg(score) filter (where isfinite(score)) as mean
from score_docs
where key = $scores_key
group by scorer;
