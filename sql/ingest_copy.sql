-- Copy the rows of unchanged inputs (registered as `batch`: role, file) from base partition $base into $key.
-- Grain: every row of those inputs; doc_idx is renumbered densely per role in the base's order.
insert into ingest_docs (key, role, doc_idx, doc_id, source_id, text, n_tokens, n_chars, source, file, line, fields)
select $key, d.role, row_number() over (partition by d.role order by d.doc_idx) - 1,
       d.doc_id, d.source_id, d.text, d.n_tokens, d.n_chars, d.source, d.file, d.line, d.fields
from ingest_docs as d
join batch as b on b.role = d.role and b.file = d.file
where d.key = $base;
insert into ingest_quarantine (key, role, file, line, reason, detail, excerpt)
select $key, q.role, q.file, q.line, q.reason, q.detail, q.excerpt
from ingest_quarantine as q
join batch as b on b.role = q.role and b.file = q.file
where q.key = $base;
insert into ingest_duplicates (key, role, doc_id, file, line, kept_file, kept_line)
select $key, u.role, u.doc_id, u.file, u.line, u.kept_file, u.kept_line
from ingest_duplicates as u
join batch as b on b.role = u.role and b.file = u.file
where u.key = $base;
insert into ingest_files (key, role, file, size_bytes, sha256, records, ingested, quarantined, duplicates)
select $key, f.role, f.file, f.size_bytes, f.sha256, f.records, f.ingested, f.quarantined, f.duplicates
from ingest_files as f
join batch as b on b.role = f.role and b.file = f.file
where f.key = $base;
insert into ingest_objects (key, role, file, size_bytes, identity, etag, version_id, read_in, retries)
select $key, o.role, o.file, o.size_bytes, o.identity, o.etag, o.version_id, o.read_in, o.retries
from ingest_objects as o
join batch as b on b.role = o.role and b.file = o.file
where o.key = $base;
