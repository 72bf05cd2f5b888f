-- With the legacy featurize tables dropped, forget the partitions they held: their ledger and info rows.
-- Grain: every featurize row of shard_done and featurize_info (all of an older featurize version).
delete from shard_done where stage = 'featurize';
delete from featurize_info;
