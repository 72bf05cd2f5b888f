-- Forget every recorded shard of one stage (all partitions): they are computed again.
-- Grain: every shard_done row of $stage.
delete from shard_done where stage = $stage
