-- Space sizes of a featurize partition, and the text prefix its n-grams count, for readers that do not
-- carry the featurize settings.
-- Grain: one row per key (dsir_buckets, dim, max_chars).
select dsir_buckets, dim, max_chars
from featurize_info
where key = $key
