-- The ids of one role's documents partition $key already holds (copied from its base, or committed by a
-- killed attempt), sorted by the dedup hash (a doc_id's leading 32 bits): what the copies among the inputs
-- still to load are checked against. Same h as tasks/ingest.py's sorted_ids.
-- Grain: one row per document.
select ('0x' || substr(doc_id, 1, 8))::ubigint::bigint as h, doc_id, file, line
from ingest_docs
where key = $key and role = $role
order by h
