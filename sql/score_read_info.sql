-- One scorer's recorded settings and fitted statistics (e.g. where the influence state file is).
-- Grain: (score partition, scorer): at most one row.
select params::varchar as params
from score_info
where key = $key and scorer = $scorer
