-- Append one info row per scorer from the registered frame `batch` (scorer, version, params as JSON text).
-- Grain: scorer.
insert into score_info
select $key, scorer, version, params::json
from batch;
