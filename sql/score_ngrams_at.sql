-- Hashed n-gram counts of chosen documents of one role (the classifier's sampled negatives).
-- Grain: one row per doc_idx in $idx, in doc_idx order.
select doc_idx, buckets, counts
from featurize_ngrams
where key = $key and role = $role and doc_idx in (select unnest($idx::bigint[]))
order by doc_idx
