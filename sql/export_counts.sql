-- Headline counts of one run: pool and target sizes, duplicates dropped, selection totals.
-- grain: one row per run (inputs: ingest_docs, ingest_duplicates, select_selection)
with pool as (
    select doc_idx, n_tokens from ingest_docs where key = $docs_key and role = 'pool'
),
sel as (
    select p.n_tokens
    from select_selection as s
    join pool as p on p.doc_idx = s.doc_idx
    where s.key = $selection_key
)
select
    (select count(*) from pool) as pool_docs,
    (select coalesce(sum(n_tokens), 0) from pool)::bigint as pool_tokens,
    (select count(*) from ingest_docs where key = $docs_key and role = 'target') as target_docs,
    (select count(*) from ingest_duplicates where key = $docs_key and role = 'pool') as duplicates,
    (select count(*) from ingest_duplicates where key = $docs_key and role = 'target') as target_duplicates,
    (select count(*) from sel) as selected_docs,
    (select coalesce(sum(n_tokens), 0) from sel)::bigint as selected_tokens;
