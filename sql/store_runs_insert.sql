-- Record one flow run as running in this process.
-- Grain: one row per flow run.
insert into store_runs values ($flow_run_id, $flow_run_name, $host, $pid, $started_at)
