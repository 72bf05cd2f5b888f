-- Featurize tables of stores written before the parts were read in place (their partitions' keys are of an
-- older featurize version, never read again); the stage drops them so its views can take the names.
-- Grain: one row per such table.
select table_name
from information_schema.tables
where table_type = 'BASE TABLE' and table_name in ('featurize_vectors', 'featurize_ngrams')
