-- Append the bandit's final per-cluster state from the registered frame `batch`.
-- Grain: cluster.
insert into select_arms
select $key, cluster, reward_sum, pulls, direct_pulls, cursor, size, exhausted
from batch;
