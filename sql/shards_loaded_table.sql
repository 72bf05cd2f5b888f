-- Whether $name is a table (a store of an older version, which loaded the stage's rows) rather than a view.
-- Grain: one row if it is a table, none otherwise.
select table_name
from information_schema.tables
where table_type = 'BASE TABLE' and table_name = $name
