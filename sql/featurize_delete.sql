-- Remove one featurize partition before it is rewritten (delete-then-insert on key).
-- Grain: every row of the partition $key in each featurize table.
delete from featurize_vectors where key = $key;
delete from featurize_ngrams where key = $key;
delete from featurize_info where key = $key;
