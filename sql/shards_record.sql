-- Record one shard as loaded (replacing an earlier record of the same range).
-- Grain: one row per (stage, key, role, lo, hi).
delete from shard_done where stage = $stage and key = $key and role = $role and lo = $lo and hi = $hi;
insert into shard_done (stage, key, role, lo, hi, rows, seconds, worker, info, source, done_at)
values ($stage, $key, $role, $lo, $hi, $rows, $seconds, $worker, $info, $source, current_timestamp::timestamp);
