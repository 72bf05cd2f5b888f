-- The inputs of the base partition $base and their content identity.
-- Grain: one row per (role, input).
select role, file, identity
from ingest_objects
where key = $base
order by role, file;
