-- Remove a featurize partition's n-gram totals before they are rewritten.
-- Grain: every row of key $key.
delete from featurize_totals where key = $key
