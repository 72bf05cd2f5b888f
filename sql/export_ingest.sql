-- How the run's ingest partition was built: its base, inputs reused and read, object reads and retries.
-- grain: at most one row (inputs: ingest_runs)
select base_key, inputs, reused, read, added, changed, removed, reread, docs_reused,
       objects_read, bytes_read, retries
from ingest_runs
where key = $docs_key;
