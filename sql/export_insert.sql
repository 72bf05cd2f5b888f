-- Record a published output: directory, manifest checksum, time and totals.
-- grain: one row per published output (key)
insert into export_runs (key, output, manifest_sha256, published_at, docs, tokens)
values ($key, $output, $manifest_sha256, $published_at, $docs, $tokens);
