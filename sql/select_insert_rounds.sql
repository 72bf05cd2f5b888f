-- Append the bandit's rounds from the registered frame `batch`.
-- Grain: (round, pulled cluster).
insert into select_rounds
select $key, round, cluster, ucb, mean_probe, reward, accepted, block_start, block_docs, tokens_accepted
from batch;
