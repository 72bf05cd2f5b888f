-- Hashed n-gram count sums of the target, the pool, the selection and a same-size random pool subset.
-- grain: one row per (role, selected, in_random, bucket) (inputs: featurize_ngrams, select_selection, ingest_docs)
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
        n.role,
        n.role = 'pool' and n.doc_idx in (select doc_idx from sel) as selected,
        n.role = 'pool' and n.doc_idx in (select doc_idx from rnd) as in_random,
        unnest(n.buckets) as bucket,
        unnest(n.counts)::bigint as n
    from featurize_ngrams as n
    where n.key = $features_key
)
select role, selected, in_random, bucket::integer as bucket, sum(n)::bigint as n
from flat
group by all;
