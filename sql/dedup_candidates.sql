-- Candidate edges of a dedup partition: each document sharing a key with others, joined to the first of them.
-- Grain: one row per distinct (a, b), a < b (a star per shared key is enough for connected components).
with keyed as (
    select doc_idx, unnest(buckets) as bucket
    from dedup_buckets
    where key = $key
),
shared as (
    select bucket, min(doc_idx) as first_doc
    from keyed
    group by bucket
    having count(*) > 1
)
select distinct shared.first_doc as a, keyed.doc_idx as b
from keyed
join shared using (bucket)
where keyed.doc_idx <> shared.first_doc
