-- Texts of one role of an ingest partition, in doc_idx order (input of the heuristic scorer).
-- Grain: document.
select doc_idx, text
from ingest_docs
where key = $key and role = $role
order by doc_idx
