-- Texts (first $max_chars characters) of the pool documents probed in one bandit round.
-- Grain: pool document (one row per doc_idx in $idx).
select doc_idx, left(text, $max_chars) as text
from ingest_docs
where key = $key and role = 'pool' and doc_idx in (select unnest($idx::bigint[]));
