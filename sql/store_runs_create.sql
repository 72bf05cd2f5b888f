-- Create the run ledger: the flow runs that opened this store, and the process each ran in.
-- Grain: one row per flow run (a curate run and the flows it runs inside in the same process).
create table if not exists store_runs (
    flow_run_id varchar not null,
    flow_run_name varchar not null,
    host varchar not null,       -- socket.gethostname() of the process
    pid bigint not null,         -- the process the run executed in
    started_at timestamp not null
);
