-- Which inputs of the base partition $base hold duplicates whose kept copy is in another input.
-- Grain: one row per (role, input, input of the kept copy).
select distinct role, file, kept_file
from ingest_duplicates
where key = $base and file <> kept_file
order by role, file, kept_file;
