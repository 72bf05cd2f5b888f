-- Documents of one role already in partition $key (copied from its base): where doc_idx continues.
-- Grain: one row (the count).
select count(*) from ingest_docs where key = $key and role = $role
