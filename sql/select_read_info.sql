-- The resolved settings and statistics a select partition recorded (tau, alpha, docs_scored, ...).
-- Grain: setting/statistic.
select name, value
from select_info
where key = $key
order by name;
