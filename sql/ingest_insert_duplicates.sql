-- Append a batch of dropped exact duplicates (registered as `batch`) to partition $key.
-- Grain: one row per dropped copy (role, file, line), pointing at the kept copy.
insert into ingest_duplicates (key, role, doc_id, file, line, kept_file, kept_line)
select $key, role, doc_id, file, line, kept_file, kept_line
from batch;
