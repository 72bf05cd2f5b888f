-- Documents of one role already in partition $key (copied from its base): later copies are duplicates.
-- Grain: one row per document (role, doc_idx).
select doc_id, file, line
from ingest_docs
where key = $key and role = $role
order by doc_idx;
