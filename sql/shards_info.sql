-- Per-shard info (JSON) of one stage partition's loaded shards, e.g. each scorer's counts to merge.
-- Grain: shard, in (role, lo) order.
select info
from shard_done
where stage = $stage and key = $key
order by role, lo
