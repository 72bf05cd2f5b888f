-- Append the run's resolved settings and statistics from the registered frame `batch`.
-- Grain: setting/statistic (name).
insert into select_info
select $key, name, value
from batch;
