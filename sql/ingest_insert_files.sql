-- Append per-file counts (registered as `batch`) to partition $key.
-- Grain: one row per input file (role, file).
insert into ingest_files (key, role, file, size_bytes, sha256, records, ingested, quarantined, duplicates)
select $key, role, file, size_bytes, sha256, records, ingested, quarantined, duplicates
from batch;
