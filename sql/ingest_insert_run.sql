-- Record how partition $key was built (registered as `batch`: one row).
-- Grain: one row per ingest partition (key).
insert into ingest_runs (key, base_key, section, created_at, inputs, reused, read, added, changed, removed, reread,
                         docs_reused, objects_read, bytes_read, retries)
select $key, base_key, section, created_at, inputs, reused, read, added, changed, removed, reread,
       docs_reused, objects_read, bytes_read, retries
from batch;
