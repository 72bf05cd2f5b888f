-- One shard's scorer inputs: texts and hashed n-gram counts of pool documents lo <= doc_idx < hi.
-- Grain: one row per pool document of the shard, in doc_idx order.
select d.doc_idx, d.text, n.buckets, n.counts
from ingest_docs d
join featurize_ngrams n
  on n.key = $features_key and n.role = 'pool' and n.doc_idx = d.doc_idx
     and n.doc_idx >= $lo and n.doc_idx < $hi
where d.key = $docs_key and d.role = 'pool' and d.doc_idx >= $lo and d.doc_idx < $hi
order by d.doc_idx
