-- Create the score stage's tables: one score per (pool document, scorer), one info row per scorer.
-- Grain: score_docs (key, doc_idx, scorer); score_info (key, scorer).
create table if not exists score_docs (
    key varchar not null,
    doc_idx bigint not null,      -- pool document (dense 0..n-1 within the ingest partition)
    scorer varchar not null,      -- heuristic | dsir | classifier | combined (influence: score_info only)
    version varchar not null,     -- the scorer's VERSION (combined: its own plus its components')
    score double not null,        -- higher is better, combined is in [0, 1]
    detail varchar                -- heuristic: comma-joined failed rules ('' = all passed), else null
);
create table if not exists score_info (
    key varchar not null,
    scorer varchar not null,
    version varchar not null,
    params json not null          -- settings and fitted statistics (classifier held-out accuracy, influence state path + sha256)
);
