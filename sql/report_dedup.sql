-- Near duplicates dropped before selection, by reason (the dedup partitions the run's select stage used).
-- grain: one row per reason (inputs: dedup_duplicates)
select reason, count(*) as docs, count(distinct component) as components
from dedup_duplicates
where list_contains($keys, key)
group by reason
order by reason
