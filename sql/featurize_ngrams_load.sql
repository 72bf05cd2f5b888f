-- DSIR-space n-gram counts of one role of a featurize partition, in doc_idx order.
-- Grain: one row per document.
select doc_idx, buckets, counts
from featurize_ngrams
where key = $key and role = $role
order by doc_idx
