-- Pool size and selected documents/tokens of every cluster, for coverage and the size plot.
-- grain: one row per cluster (inputs: cluster_assignments, select_selection, ingest_docs)
select
    a.cluster,
    count(*) as pool_docs,
    count(s.doc_idx) as selected_docs,
    coalesce(sum(d.n_tokens) filter (where s.doc_idx is not null), 0)::bigint as selected_tokens
from cluster_assignments as a
left join select_selection as s
    on s.key = $selection_key and s.doc_idx = a.doc_idx
left join ingest_docs as d
    on d.key = $docs_key and d.role = 'pool' and d.doc_idx = a.doc_idx
where a.key = $clusters_key
group by a.cluster
order by a.cluster;
