-- Remove one select partition from every select table, so a rerun replaces it (idempotent).
-- Grain: partition (key).
delete from select_rounds where key = $key;
delete from select_probes where key = $key;
delete from select_selection where key = $key;
delete from select_arms where key = $key;
delete from select_info where key = $key;
