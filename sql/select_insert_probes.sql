-- Append probe scores (calibration round 0 and bandit rounds) from the registered frame `batch`.
-- Grain: probe.
insert into select_probes
select $key, round, cluster, doc_idx, score
from batch;
