-- Append scores from the registered frame `batch` (doc_idx, scorer, version, score, detail).
-- Grain: (pool document, scorer).
insert into score_docs
select $key, doc_idx, scorer, version, score, detail
from batch;
