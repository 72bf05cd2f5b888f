-- Remove one shard's scores of a score partition before loading it (a shard is never counted twice).
-- Grain: every score_docs row of key $key with $lo <= doc_idx < $hi (all scorers).
delete from score_docs where key = $key and doc_idx >= $lo and doc_idx < $hi
