-- Create the dedup tables: the dropped near duplicates and info rows (each pool document's LSH / one-word-edit keys
-- are the view dedup_buckets over Parquet parts, empty until a partition has parts: dedup_views).
-- Grain: dedup_buckets one row per (key, doc_idx); dedup_duplicates one row per (key, dropped doc_idx); dedup_info one row per (key, name).
create view if not exists dedup_buckets as
select null::varchar as key, null::bigint as doc_idx, null::integer as n_words, null::ubigint[] as buckets
where false;
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
