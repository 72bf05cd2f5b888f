-- One role's n-gram totals of a featurize partition (registered arrow table `batch`: bucket, total), summed from
-- the shard tasks' totals in the ledger.
-- Grain: one row per bucket that occurs.
insert into featurize_totals (key, role, bucket, total)
select $key, $role, bucket, total
from batch
