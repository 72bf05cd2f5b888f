-- The selector's resolved settings and statistics (tau, alpha, block size, ...).
-- grain: one row per setting/statistic (inputs: select_info)
select name, cast(value as varchar) as value
from select_info
where key = $selection_key
order by name;
