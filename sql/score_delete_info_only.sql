-- Remove a score partition's info rows before they are rewritten (the scores stay).
-- Grain: partition (key).
delete from score_info where key = $key
