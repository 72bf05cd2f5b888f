-- Documents of one ingest partition by role, with their doc_idx range (to check it is dense).
-- Grain: role (pool, target).
select role, count(*) as docs, min(doc_idx) as min_idx, max(doc_idx) as max_idx
from ingest_docs
where key = $key
group by role
