-- Ingest tables: documents, quarantined records, dropped duplicates and per-file counts.
-- Grain: see each table; every row belongs to one ingest partition (key).
create table if not exists ingest_docs (
    key varchar not null,
    role varchar not null,        -- pool | target
    doc_idx bigint not null,      -- dense 0..n-1 per (key, role) in (file, line) order
    doc_id varchar not null,      -- content hash of the normalized text
    source_id varchar,            -- the record's own id (ingest.id_field), as text
    text varchar not null,
    n_tokens bigint not null,
    n_chars bigint not null,
    source varchar not null,      -- the record's "source" field, else the file name
    file varchar not null,
    line bigint not null,         -- 1-based line (JSONL), row (Parquet) or 1 (.txt)
    fields varchar                -- JSON object of the record's other fields
);
create table if not exists ingest_quarantine (
    key varchar not null,
    role varchar not null,
    file varchar not null,
    line bigint not null,
    -- malformed_json | not_an_object | missing_text | wrong_type | empty_text | undecodable | oversize
    reason varchar not null,
    detail varchar not null,
    excerpt varchar not null      -- first 200 chars of the raw record
);
create table if not exists ingest_duplicates (
    key varchar not null,
    role varchar not null,
    doc_id varchar not null,
    file varchar not null,
    line bigint not null,
    kept_file varchar not null,
    kept_line bigint not null
);
create table if not exists ingest_files (
    key varchar not null,
    role varchar not null,
    file varchar not null,
    size_bytes bigint not null,
    sha256 varchar not null,
    records bigint not null,      -- = ingested + quarantined + duplicates
    ingested bigint not null,
    quarantined bigint not null,
    duplicates bigint not null
);
