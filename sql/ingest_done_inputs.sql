-- Inputs an earlier, killed attempt at ingest partition $key committed (role 'base': the copy from its base).
-- Grain: one row per committed input (role, position among the inputs read, its counts as JSON).
select role, lo, info
from shard_done
where stage = 'ingest' and key = $key
