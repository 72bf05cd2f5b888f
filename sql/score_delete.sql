-- Remove a score partition that has no component scorers (so no parts) before it is rewritten.
-- Grain: partition (key).
delete from score_combined where key = $key;
delete from score_info where key = $key;
