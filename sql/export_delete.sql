-- Remove the export partition for this key before its row is written again (idempotent rerun).
-- grain: one row per published output (key)
delete from export_runs where key = $key;
