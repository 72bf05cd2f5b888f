-- Insert a dedup partition's settings and counts (the registered frame `batch`: name, value as JSON).
-- Grain: one row per (key, name).
insert into dedup_info (key, name, value)
select $key, name, value from batch
