-- Selected pool documents in selection rank order, with everything the output file carries.
-- grain: one row per selected document (inputs: select_selection, ingest_docs, cluster_assignments)
select
    s.doc_idx,
    d.doc_id as id,
    d.source_id,
    d.text,
    d.source,
    d.file,
    d.line,
    d.fields,
    d.n_tokens,
    coalesce(s.cluster, a.cluster) as cluster,
    s.rank,
    s.round,
    s.reason
from select_selection as s
join ingest_docs as d
    on d.key = $docs_key and d.role = 'pool' and d.doc_idx = s.doc_idx
left join cluster_assignments as a
    on a.key = $clusters_key and a.doc_idx = s.doc_idx
where s.key = $selection_key
order by s.rank;
