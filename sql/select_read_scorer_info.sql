-- One scorer's recorded settings and fitted statistics in a score partition (influence: its state file).
-- Grain: (score partition, scorer): at most one row.
select params::varchar as params
from score_info
where key = $key and scorer = $scorer;
