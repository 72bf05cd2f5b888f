-- Create the export stage's table: where each selection was published and its manifest checksum.
-- grain: one row per published output (key)
create table if not exists export_runs (
    key varchar,
    output varchar,
    manifest_sha256 varchar,
    published_at timestamp,
    docs bigint,
    tokens bigint
);
