-- Selected documents and tokens by selection reason (quad_*, random, topk, dsir).
-- grain: one row per reason (inputs: select_selection, ingest_docs)
select
    s.reason,
    count(*)::bigint as docs,
    sum(d.n_tokens)::bigint as tokens
from select_selection as s
join ingest_docs as d
    on d.key = $docs_key and d.role = 'pool' and d.doc_idx = s.doc_idx
where s.key = $selection_key
group by s.reason
order by tokens desc, s.reason;
