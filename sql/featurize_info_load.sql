-- Space sizes of a featurize partition, for readers that do not carry the featurize settings.
-- Grain: one row per key (dsir_buckets, dim).
select dsir_buckets, dim
from featurize_info
where key = $key
