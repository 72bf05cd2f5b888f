-- Scores per scorer of every selected pool document and of a hash sample of the pool (every
-- document when the pool holds at most SCORE_SAMPLE), flagged selected / sampled, for the plots.
-- grain: one row per (pool document, scorer) that is selected or sampled (inputs: score_docs, select_selection)
select c.scorer, c.score, s.doc_idx is not null as selected, hash(c.doc_idx, $seed) % $modulus = 0 as sampled
from score_docs as c
left join select_selection as s
    on s.key = $selection_key and s.doc_idx = c.doc_idx
where c.key = $scores_key
  and (s.doc_idx is not null or hash(c.doc_idx, $seed) % $modulus = 0);
