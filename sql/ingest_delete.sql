-- Remove one ingest partition from every ingest table before it is rewritten.
-- Grain: all rows of key $key.
delete from ingest_docs where key = $key;
delete from ingest_quarantine where key = $key;
delete from ingest_duplicates where key = $key;
delete from ingest_files where key = $key;
delete from ingest_objects where key = $key;
delete from ingest_runs where key = $key;
