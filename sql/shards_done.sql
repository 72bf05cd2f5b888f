-- Shards of one stage partition already loaded (a rerun skips them).
-- Grain: shard (role, lo, hi).
select role, lo, hi
from shard_done
where stage = $stage and key = $key
