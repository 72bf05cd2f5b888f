-- Append a batch of quarantined records (registered as `batch`) to partition $key.
-- Grain: one row per bad record (role, file, line).
insert into ingest_quarantine (key, role, file, line, reason, detail, excerpt)
select $key, role, file, line, reason, detail, excerpt
from batch;
