-- The LSA's fit sample drawn in proportion to tokens: weighted sampling without replacement
-- (Efraimidis & Spirakis 2006). Each pool document gets the key -ln(u) / n_tokens, u in (0, 1)
-- from hash(doc_idx, $seed); the $n smallest keys are the sample. Documents without tokens are
-- never drawn. Only the top $n are kept while scanning, so memory does not grow with the pool.
-- Grain: one row per sampled pool document, in doc_idx order.
select doc_idx
from (
    select doc_idx
    from ingest_docs
    where key = $key and role = 'pool' and n_tokens > 0
    order by -ln(((hash(doc_idx, $seed) >> 11)::double + 0.5) / 9007199254740992.0) / n_tokens, doc_idx
    limit $n
)
order by doc_idx
