-- Full texts of chosen documents of one role (the seeded sample the LSA is fitted on).
-- Grain: one row per doc_idx in $idx, in doc_idx order.
select doc_idx, text
from ingest_docs
where key = $key and role = $role and doc_idx in (select unnest($idx::bigint[]))
order by doc_idx
