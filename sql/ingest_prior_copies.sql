-- Documents of a partition already kept whose doc_id is among the batch's (registered `batch`: doc_id):
-- the first copy a later duplicate points at. Memory per batch, not per pool.
-- Grain: one row per kept document matching a batch doc_id.
select d.doc_id, d.file as kept_file, d.line as kept_line
from ingest_docs d
semi join batch b on b.doc_id = d.doc_id
where d.key = $key and d.role = $role
