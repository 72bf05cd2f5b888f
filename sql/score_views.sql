-- Every pool document's score per scorer, for every score partition: the component scorers' rows read in place
-- from the shard tasks' Parquet parts ($files: <store>.data/score/key=K/role=pool/LO-HI.parquet; `key` comes
-- from the path), and the combined rows the stage computes from their pool-wide ranks (score_combined).
-- Grain: (key, doc_idx, scorer). Columns: scorer heuristic | dsir | classifier | combined (influence: score_info
-- only); version the scorer's VERSION; score higher is better; detail heuristic's comma-joined failed rules.
create or replace view score_docs as
select key, doc_idx, scorer, version, score, detail
from read_parquet($files, hive_partitioning = true, hive_types = {'key': varchar, 'role': varchar})
union all
select key, doc_idx, scorer, version, score, detail
from score_combined;
