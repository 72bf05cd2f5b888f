-- Remove a featurize partition's info row before it is rewritten.
-- Grain: the row of key $key.
delete from featurize_info where key = $key
