-- Append the selected documents, in selection order, from the registered frame `batch`.
-- Grain: selected document.
insert into select_selection
select $key, doc_idx, rank, cluster, round, reason
from batch;
