-- Every pool document's score per scorer, flagged when the document was selected.
-- grain: one row per (pool document, scorer) (inputs: score_docs, select_selection)
select c.scorer, c.score, s.doc_idx is not null as selected
from score_docs as c
left join select_selection as s
    on s.key = $selection_key and s.doc_idx = c.doc_idx
where c.key = $scores_key;
