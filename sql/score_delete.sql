-- Remove one score partition from both score tables, so a rerun replaces it (idempotent).
-- Grain: partition (key).
delete from score_docs where key = $key;
delete from score_info where key = $key;
