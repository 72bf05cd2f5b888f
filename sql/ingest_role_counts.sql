-- Documents kept and records quarantined (by reason) of ingest partition $key: is there anything to curate?
-- Grain: one row per (role, reason); reason is null on the row counting a role's documents.
select role, null as reason, count(*) as n from ingest_docs where key = $key group by role
union all
select role, reason, count(*) as n from ingest_quarantine where key = $key group by role, reason
order by role, reason nulls first
