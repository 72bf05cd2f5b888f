-- Create the dedup tables: each pool document's LSH / one-word-edit keys, the dropped near duplicates, info rows.
-- Grain: dedup_buckets one row per (key, doc_idx); dedup_duplicates one row per (key, dropped doc_idx); dedup_info one row per (key, name).
create table if not exists dedup_buckets (
    key varchar not null,
    doc_idx bigint not null,       -- pool document
    n_words integer not null,      -- normalized words (decides the matcher: one-word edits, MinHash, or none)
    buckets ubigint[] not null     -- LSH band keys and/or one-word-edit keys: documents sharing one are candidates
);
create table if not exists dedup_duplicates (
    key varchar not null,          -- dedup (fuzzy) or semdedup (semantic) partition
    doc_idx bigint not null,       -- the dropped pool document
    component bigint not null,     -- its component, numbered within the partition
    representative bigint not null,-- the component's kept document (its first by doc_idx)
    component_size bigint not null,-- documents in the component, the kept one included
    reason varchar not null        -- near_duplicate | semantic_duplicate
);
create table if not exists dedup_info (
    key varchar not null,
    name varchar not null,
    value varchar not null         -- JSON
);
