-- Pool documents with doc_idx in [$lo, $hi) ($hi null: to the end) that the given dedup partitions (fuzzy and
-- semantic) dropped: the select stage never offers them.
-- Grain: one row per distinct dropped doc_idx, ascending.
select distinct doc_idx
from dedup_duplicates
where list_contains($keys, key) and doc_idx >= $lo and ($hi is null or doc_idx < $hi)
order by doc_idx
