-- The selected documents of a select partition with their source id, text and tokens (benchmark evaluation).
-- Grain: selected document, in rank order.
select s.doc_idx, d.source_id, d.source, d.text, d.n_tokens, s.reason
from select_selection as s
join ingest_docs as d on d.key = $docs_key and d.role = 'pool' and d.doc_idx = s.doc_idx
where s.key = $key
order by s.rank;
