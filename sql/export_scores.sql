-- Every scorer's score (and detail, e.g. failed heuristic rules) for the selected documents.
-- grain: one row per (selected document, scorer) (inputs: score_docs, select_selection)
select c.doc_idx, c.scorer, c.score, c.detail
from score_docs as c
where c.key = $scores_key
  and c.doc_idx in (select s.doc_idx from select_selection as s where s.key = $selection_key);
