-- Append combined scores from the registered frame `batch` (doc_idx, scorer, version, score, detail).
-- Grain: (pool document, scorer 'combined').
insert into score_combined
select $key, doc_idx, scorer, version, score, detail
from batch;
