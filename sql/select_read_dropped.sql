-- Pool documents the given dedup partitions (fuzzy and semantic) dropped: the select stage never offers them.
-- Grain: one row per distinct dropped doc_idx, ascending.
select distinct doc_idx
from dedup_duplicates
where list_contains($keys, key)
order by doc_idx
