-- Hashed n-gram count sums of the target, the pool, the selection and a same-size random pool subset: the
-- target's and the pool's are the featurize stage's totals; only the selected and the random documents' counts
-- are summed here (scanning every pool document's n-grams cost the report most of its time).
-- grain: one row per (what, bucket) with what target | raw | selected | random
-- (inputs: featurize_totals, featurize_ngrams, select_selection, ingest_docs)
with sel as (
    select s.doc_idx from select_selection as s where s.key = $selection_key
),
pool as (
    select d.doc_idx, d.n_tokens from ingest_docs as d where d.key = $docs_key and d.role = 'pool'
),
shuffled as (
    -- seeded random order of the pool; the random subset is its prefix with the selection's tokens
    select doc_idx, sum(n_tokens) over (order by hash(doc_idx, $seed), doc_idx rows unbounded preceding) as cum
    from pool
),
rnd as (
    select doc_idx from shuffled
    where cum <= (select coalesce(sum(p.n_tokens), 0) from pool as p where p.doc_idx in (select doc_idx from sel))
),
flat as (
    -- mark joins (IN) before unnest: joining first and unnesting after is ~50x slower in DuckDB 1.4
    select
        n.doc_idx in (select doc_idx from sel) as selected,
        n.doc_idx in (select doc_idx from rnd) as in_random,
        unnest(n.buckets) as bucket,
        unnest(n.counts)::bigint as n
    from featurize_ngrams as n
    where n.key = $features_key and n.role = 'pool'
      and (n.doc_idx in (select doc_idx from sel) or n.doc_idx in (select doc_idx from rnd))
)
select 'selected' as what, bucket::integer as bucket, sum(n)::bigint as n from flat where selected group by all
union all
select 'random' as what, bucket::integer as bucket, sum(n)::bigint as n from flat where in_random group by all
union all
select case role when 'target' then 'target' else 'raw' end as what, bucket, total as n
from featurize_totals
where key = $features_key and role in ('target', 'pool');
