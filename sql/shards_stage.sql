-- Recorded shards of every partition of one stage (the parts its views read).
-- Grain: shard (key, role, lo, hi), in that order.
select key, role, lo, hi
from shard_done
where stage = $stage
order by key, role, lo
