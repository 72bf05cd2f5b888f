-- Size and doc_idx span of a featurize partition's pool, and the width of its first vector (streaming plan).
-- Grain: one row per featurize key (pool role).
select count(*) as n, min(doc_idx) as first_idx, max(doc_idx) as last_idx,
       (select max(len(vec)) from featurize_vectors
        where key = $key and role = 'pool' and doc_idx = 0) as dim
from featurize_vectors
where key = $key and role = 'pool'
