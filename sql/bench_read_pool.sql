-- Who each pool document is (content id, the source's own id, source) and its tokens, for benchmarks.
-- Grain: pool document, ordered by doc_idx (inputs: ingest_docs).
select doc_idx, doc_id, source_id, source, n_tokens
from ingest_docs
where key = $key and role = 'pool'
order by doc_idx;
