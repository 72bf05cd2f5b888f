-- How much the bandit probed: probe rows, distinct documents probed, calibration probes (round 0).
-- grain: one row per selection partition (inputs: select_probes)
select
    count(*) as probes,
    count(distinct doc_idx) as docs_probed,
    count(*) filter (where round = 0) as calibration_probes
from select_probes
where key = $selection_key;
