-- Record the identity of inputs read into partition $key (registered as `batch`).
-- Grain: one row per input (role, file).
insert into ingest_objects (key, role, file, size_bytes, identity, etag, version_id, read_in, retries)
select $key, role, file, size_bytes, identity, etag, version_id, $key, retries
from batch;
