-- Documents per role of an ingest partition (to refit the influence state the score stage saved).
-- Grain: role (pool, target).
select role, count(*) as docs
from ingest_docs
where key = $key
group by role;
