-- Most often failed heuristic quality rules in the pool and in the selection (reasons are data).
-- grain: one row per rule, top $top by pool count (inputs: score_docs heuristic detail, select_selection)
with failed as (
    select unnest(string_split(c.detail, ',')) as rule, s.doc_idx is not null as selected
    from score_docs as c
    left join select_selection as s
        on s.key = $selection_key and s.doc_idx = c.doc_idx
    where c.key = $scores_key and c.scorer = 'heuristic' and coalesce(c.detail, '') <> ''
)
select rule, count(*) as pool_docs, count(*) filter (where selected) as selected_docs
from failed
where rule <> ''
group by rule
order by pool_docs desc, rule
limit $top;
