-- Append a batch of parsed, deduplicated documents (registered as `batch`) to partition $key.
-- Grain: one row per document (role, doc_idx).
insert into ingest_docs (key, role, doc_idx, doc_id, source_id, text, n_tokens, n_chars, source, file, line, fields)
select $key, role, doc_idx, doc_id, source_id, text, n_tokens, n_chars, source, file, line, fields
from batch;
