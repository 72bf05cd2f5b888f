-- Forget one recorded flow run (its process is gone and its state settled, or it is recorded again).
-- Grain: one flow run.
delete from store_runs where flow_run_id = $flow_run_id
