-- Create the score stage's tables: one score per (pool document, scorer), one info row per scorer. The
-- component scorers' rows stay in the shard tasks' Parquet parts; score_docs is them (score_views) and the
-- combined rows (score_combined), and only the combined rows until a partition has parts.
-- Grain: score_docs and score_combined (key, doc_idx, scorer); score_info (key, scorer).
create table if not exists score_combined (
    key varchar not null,
    doc_idx bigint not null,      -- pool document (dense 0..n-1 within the ingest partition)
    scorer varchar not null,      -- combined
    version varchar not null,     -- its own VERSION plus its components'
    score double not null,        -- in [0, 1], higher is better
    detail varchar                -- null
);
create view if not exists score_docs as
select key, doc_idx, scorer, version, score, detail
from score_combined;
create table if not exists score_info (
    key varchar not null,
    scorer varchar not null,
    version varchar not null,
    params json not null          -- settings and fitted statistics (classifier held-out accuracy, influence state path + sha256)
);
