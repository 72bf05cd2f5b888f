-- Create the shard ledger: which shards of a stage partition are loaded into the store.
-- Grain: one row per (stage, key, role, lo, hi); written in the same transaction as the shard's rows.
create table if not exists shard_done (
    stage varchar not null,
    key varchar not null,
    role varchar not null,
    lo bigint not null,
    hi bigint not null,
    rows bigint not null,
    seconds double not null,
    worker varchar not null,
    info varchar,             -- what the stage keeps per shard (JSON), e.g. each scorer's counts
    source varchar not null,  -- computed | recovered (finished part of a killed run, loaded without recomputing)
    done_at timestamp not null
);
