-- The first $max_chars characters of chosen documents of one role (the seeded sample the LSA is
-- fitted on; featurizing never reads further, and a sample drawn by tokens is mostly long documents).
-- Grain: one row per doc_idx in $idx, in doc_idx order.
select doc_idx, substr(text, 1, $max_chars) as text
from ingest_docs
where key = $key and role = $role and doc_idx in (select unnest($idx::bigint[]))
order by doc_idx
