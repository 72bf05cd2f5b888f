-- Vectors of the pool documents of clusters lo <= cluster < hi that fuzzy dedup kept, for semantic dedup.
-- Grain: one row per document, by (cluster, doc_idx).
select c.cluster, c.doc_idx, v.vec
from cluster_assignments as c
join featurize_vectors as v on v.key = $features_key and v.role = 'pool' and v.doc_idx = c.doc_idx
anti join (select doc_idx from dedup_duplicates where key = $near_key) as d on d.doc_idx = c.doc_idx
where c.key = $clusters_key and c.cluster >= $lo and c.cluster < $hi
order by c.cluster, c.doc_idx
