-- Percentile rank of every pool document's score per component scorer, ties at their average rank:
-- (average rank - 1) / (n - 1), as scipy's rankdata(method='average'); null when n = 1 (read as 0.5).
-- Grain: (doc_idx, scorer) for the scorers in $scorers.
create or replace temp table score_ranks as
select doc_idx, scorer,
       (rank() over (partition by scorer order by score)
        + (count(*) over (partition by scorer, score) - 1) / 2.0 - 1)
       / nullif(count(*) over (partition by scorer) - 1, 0) as pct
from score_docs
where key = $key and scorer in (select unnest($scorers::varchar[]));
