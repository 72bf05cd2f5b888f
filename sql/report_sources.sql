-- Tokens per source in the pool and in the selection, for the source-mix table and plot.
-- grain: one row per source (inputs: ingest_docs, select_selection)
select
    coalesce(d.source, '(none)') as source,
    sum(d.n_tokens)::bigint as pool_tokens,
    coalesce(sum(d.n_tokens) filter (where s.doc_idx is not null), 0)::bigint as selected_tokens
from ingest_docs as d
left join select_selection as s
    on s.key = $selection_key and s.doc_idx = d.doc_idx
where d.key = $docs_key and d.role = 'pool'
group by all
order by pool_tokens desc, source;
