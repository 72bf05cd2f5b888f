-- The manifest checksum recorded when this export key was last published to this output.
-- grain: at most one row (key, output)
select manifest_sha256
from export_runs
where key = $key and output = $output
order by published_at desc
limit 1;
