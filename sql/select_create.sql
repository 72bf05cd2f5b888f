-- Create the select stage's tables (bandit rounds, probes, selection, final arm state, run info).
-- Grain: see ARCHITECTURE.md (every table is partitioned by `key`).
create table if not exists select_rounds (
    key varchar not null,
    round integer not null,          -- 1-based bandit round
    cluster integer not null,        -- pulled arm
    ucb double not null,             -- CS_j when the arm was picked
    mean_probe double not null,      -- mean score of the m probes drawn from the block
    reward double not null,          -- mean_probe - tau
    accepted boolean not null,       -- reward > 0
    block_start bigint not null,     -- position of the block in the cluster's shuffled order
    block_docs bigint not null,      -- documents in the block
    tokens_accepted bigint not null  -- tokens of the block that fitted the budget (0 if rejected)
);
create table if not exists select_probes (
    key varchar not null,
    round integer not null,          -- 0 = calibration probe, 1.. = bandit round
    cluster integer not null,
    doc_idx bigint not null,
    score double not null
);
create table if not exists select_selection (
    key varchar not null,
    doc_idx bigint not null,
    rank bigint not null,            -- 0-based position in selection order
    cluster integer,                 -- the document's cluster
    round integer,                   -- bandit round that accepted it (null: fill, baselines)
    reason varchar not null          -- quad_target_kind/_likely_target_kind/_related, quad_block, quad_fill, random, topk, dsir
);
create table if not exists select_arms (
    key varchar not null,
    cluster integer not null,
    reward_sum double not null,      -- R_j: direct plus shared rewards
    pulls double not null,           -- T_j: direct pulls plus shared weights
    direct_pulls integer not null,
    cursor bigint not null,          -- documents of the cluster the bandit has walked
    size bigint not null,
    exhausted boolean not null
);
create table if not exists select_info (
    key varchar not null,
    name varchar not null,
    value varchar                    -- null when the setting does not apply to the selector
);
