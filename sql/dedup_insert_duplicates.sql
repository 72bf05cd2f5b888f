-- Insert a dedup partition's dropped documents (the registered frame `batch`).
-- Grain: one row per dropped pool document.
insert into dedup_duplicates (key, doc_idx, component, representative, component_size, reason)
select $key, doc_idx, component, representative, component_size, reason from batch
