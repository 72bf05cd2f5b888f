-- Remove one shard's rows of a featurize partition before loading it (a shard is never counted twice).
-- Grain: every row of key $key, role $role with $lo <= doc_idx < $hi.
delete from featurize_vectors where key = $key and role = $role and doc_idx >= $lo and doc_idx < $hi;
delete from featurize_ngrams where key = $key and role = $role and doc_idx >= $lo and doc_idx < $hi;
