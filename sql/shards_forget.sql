-- Forget one recorded shard of a stage partition (its range belongs to an earlier, other shard plan).
-- Grain: the shard_done row of ($stage, $key, $role, $lo, $hi).
delete from shard_done where stage = $stage and key = $key and role = $role and lo = $lo and hi = $hi
