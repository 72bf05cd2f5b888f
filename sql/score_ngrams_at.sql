-- Hashed n-gram counts of chosen documents of one role (registered arrow `picked`: doc_idx, all within
-- [$lo, $hi], so only the parts and row groups that overlap it are read), for the classifier's sampled
-- negatives and the novelty discount's candidates. A semi join against a registered relation, not
-- `in (unnest($list))`: a list parameter of 300k ids took a minute to bind.
-- Grain: one row per doc_idx in `picked`, in doc_idx order.
select f.doc_idx, f.buckets, f.counts
from featurize_ngrams f
semi join picked p on f.doc_idx = p.doc_idx
where f.key = $key and f.role = $role and f.doc_idx >= $lo and f.doc_idx <= $hi
order by f.doc_idx
