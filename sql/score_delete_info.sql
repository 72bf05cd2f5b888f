-- Remove a score partition's info rows and combined scores before they are recomputed from the parts.
-- Grain: partition (key).
delete from score_info where key = $key;
delete from score_combined where key = $key;
