-- Ingest tables: documents, quarantined records, dropped duplicates, per-input counts and identities, partitions.
-- Grain: see each table; every row belongs to one ingest partition (key).
create table if not exists ingest_docs (
    key varchar not null,
    role varchar not null,        -- pool | target
    doc_idx bigint not null,      -- dense 0..n-1 per (key, role): reused inputs' rows first, then read ones
    doc_id varchar not null,      -- content hash of the normalized text
    source_id varchar,            -- the record's own id (ingest.id_field), as text
    text varchar not null,
    n_tokens bigint not null,
    n_chars bigint not null,
    source varchar not null,      -- the record's "source" field, else the file name
    file varchar not null,        -- absolute local path or s3:// URL
    line bigint not null,         -- 1-based line (JSONL), row (Parquet) or 1 (.txt)
    fields varchar                -- JSON object of the record's other fields
);
create table if not exists ingest_quarantine (
    key varchar not null,
    role varchar not null,
    file varchar not null,
    line bigint not null,
    -- malformed_json | not_an_object | too_deep | missing_text | wrong_type | empty_text | undecodable | oversize
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
    sha256 varchar not null,      -- of the bytes (objects: hashed while they were read)
    records bigint not null,      -- = ingested + quarantined + duplicates
    ingested bigint not null,
    quarantined bigint not null,
    duplicates bigint not null
);
create table if not exists ingest_objects (
    key varchar not null,
    role varchar not null,
    file varchar not null,        -- absolute local path or s3:// URL
    size_bytes bigint not null,
    identity varchar not null,    -- sha256:<hex> (local file) | etag:<etag>:<size> (object)
    etag varchar,                 -- objects: ETag without quotes
    version_id varchar,           -- objects in versioned buckets, when the store reported it
    read_in varchar not null,     -- key of the partition that read it (this key, or a base it was reused from)
    retries bigint not null       -- object-store retries while reading it (0 for local files)
);
create table if not exists ingest_runs (
    key varchar not null,
    base_key varchar,             -- partition whose rows were reused (null: every input was read)
    section varchar not null,     -- the ingest settings that shape a partition (JSON), which bases must match
    created_at timestamp not null,
    inputs bigint not null,       -- = reused + read
    reused bigint not null,       -- inputs whose rows were copied from the base
    read bigint not null,         -- inputs read by this partition
    added bigint not null,
    changed bigint not null,
    removed bigint not null,      -- base inputs left out (their rows dropped)
    reread bigint not null,       -- unchanged inputs read again (a duplicate in them pointed at a dropped input)
    docs_reused bigint not null,  -- documents copied from the base (pool and target)
    objects_read bigint not null, -- s3:// objects read
    bytes_read bigint not null,   -- bytes of those objects
    retries bigint not null       -- object-store retries while reading them
);
