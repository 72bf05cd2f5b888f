-- Inputs of every earlier ingest partition built with the same ingest settings: candidate bases.
-- Grain: one row per (partition, role, input).
select r.key, r.created_at, o.role, o.file, o.identity, o.size_bytes
from ingest_runs as r
join ingest_objects as o on o.key = r.key
where r.section = $section
order by r.created_at, r.key, o.role, o.file;
