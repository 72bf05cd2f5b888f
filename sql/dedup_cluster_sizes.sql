-- Pool documents per cluster that semantic dedup considers (those fuzzy dedup kept).
-- Grain: one row per non-empty cluster, in cluster order.
select c.cluster, count(*) as docs
from cluster_assignments as c
anti join (select doc_idx from dedup_duplicates where key = $near_key) as d using (doc_idx)
where c.key = $clusters_key
group by c.cluster
order by c.cluster
