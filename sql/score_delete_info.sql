-- Remove a score partition's info rows and combined scores before they are rewritten.
-- Grain: partition (key).
delete from score_info where key = $key;
delete from score_docs where key = $key and scorer = 'combined';
