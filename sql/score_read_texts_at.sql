-- Texts (first $max_chars characters) of chosen documents of one role: the influence scorer's samples.
-- Grain: document (one row per doc_idx in $idx).
select doc_idx, left(text, $max_chars) as text
from ingest_docs
where key = $key and role = $role and doc_idx in (select unnest($idx::bigint[]))
