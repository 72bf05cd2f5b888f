-- Quarantined input records counted by reason code (pool and target together).
-- grain: one row per quarantine reason (inputs: ingest_quarantine)
select reason, count(*) as n
from ingest_quarantine
where key = $docs_key
group by reason
order by n desc, reason;
