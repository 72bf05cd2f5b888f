-- Forget a stage partition's shard ledger before the partition is rebuilt from scratch.
-- Grain: every shard_done row of ($stage, $key).
delete from shard_done where stage = $stage and key = $key
