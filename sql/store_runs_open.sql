-- Runs recorded by earlier processes: candidates for runs a killed process left RUNNING.
-- Grain: one row per recorded flow run.
select flow_run_id, flow_run_name, host, pid from store_runs order by started_at, flow_run_id
