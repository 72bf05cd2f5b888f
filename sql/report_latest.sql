-- The most recently published output recorded in the store (what `quadflow report` rebuilds).
-- grain: at most one row (export_runs)
select key, output, manifest_sha256, published_at, docs, tokens
from export_runs
order by published_at desc
limit 1;
