"""Dedup: near-duplicate documents of the pool, grouped into components that the selection takes one of.

Fuzzy dedup (stage `dedup`, after ingest, on by default) gives every pool document a few 64-bit
keys; two documents sharing a key are a candidate pair (found by shard tasks, one per hash range of
the keys: `dedup_join`), and candidate pairs are joined into connected components (`components`).
Keys come from one of two matchers:

- **MinHash LSH** (Broder 1997; FineWeb's setting as the reference: word 5-gram shingles, 112
  hashes in 14 bands of 8, candidates above ~0.72 Jaccard similarity). A band's key is a hash of
  its 8 MinHash values. A document of W words uses shingles of min(shingle_size,
  max(2, W // words_per_shingle_word)) words: with 5-grams one changed word alters 5 of a 20-word
  document's 16 shingles (Jaccard 0.52, almost never a candidate), with 2-grams 2 of 19 (0.81).
- **One-word-edit neighbourhood** for short documents (min_words..short_words words): the hash of
  the word sequence and of each sequence with one word deleted. Two documents share one exactly
  when they are one word apart (a substitution, insertion or deletion) — the precision MinHash
  cannot have on ten words, where a changed word is 10% of the document and templated entries
  (dictionary definitions) differ by two. MinHash starts at short_words - 1 words, so a
  document whose copy gained or lost a word meets it in at least one matcher.

Words: NFKC, lower case, digits mapped to 0 and punctuation removed (as datatrove's text
normalization for MinHash), then runs of word characters.

The kept representative of a component is its first document by doc_idx: dedup runs before any
score exists, doc_idx is input order (an incremental ingest keeps earlier documents first), so a
growing pool keeps the copy it kept before and drops the newcomers, as ingest's exact dedup does.

Semantic dedup (stage `semdedup`, after cluster, off by default) is SemDeDup (Abbas et al. 2023):
inside each k-means cluster, documents whose vectors have cosine similarity above 1 - eps are
joined, and each component keeps its first document; documents fuzzy dedup dropped take no part.

Both write `dedup_duplicates` (one row per dropped pool document: component, representative,
reason) and `dedup_info` under their own key; the select task removes those documents from the
pool it hands the selector.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from prefect import task
from prefect.cache_policies import NO_CACHE
from scipy.sparse.csgraph import connected_components

from quadflow.log import Progress, get_logger
from quadflow.settings import DedupSettings, RunSettings
from quadflow.objectstore import ObjectStoreSettings
from quadflow.shards import (Parts, Shard, ShardResult, data_part, drop_loaded_table, execute_shards, export_texts,
                             forget_unusable_shards, hash_range, hash_ranges, keep_outputs, plan_shards, point_views,
                             run_shards, stage_parts, text_parts, worker_name)
from quadflow.store import StageRef, connect, insert_frame, make_ref, query_sql, run_sql, stage_key, transaction
from quadflow.tasking import SHARDED_CACHE_POLICY, stage_task, transient_failure
from quadflow.tasks.featurize import batch_bounds, role_counts

# polars' hash is stable within a polars version only, so its version is part of the stage key.
VERSION = f"dedup-1/polars-{pl.__version__}"
SEMANTIC_VERSION = "semdedup-1"
REASON_NEAR = "near_duplicate"
REASON_SEMANTIC = "semantic_duplicate"

# Fixed seeds and salts of the word and key hashes (the MinHash permutations take the run's seed).
_WORD_SEED = 0x5EED_D0C
_POLY = np.uint64(0x100000001B3)  # odd, so invertible modulo 2^64 (FNV-1a's 64-bit prime)
_POLY_INV = np.uint64(pow(0x100000001B3, -1, 2**64))
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_BAND_SALT = np.uint64(0x632BE59BD9B4E019)
_EDIT_SALT = np.uint64(0xD6E8FEB86659FD93)
_SHINGLE_SALT = np.uint64(0xA0761D6478BD642F)
_U32 = np.uint64(32)
MINHASH_OVERLAP = 2  # MinHash keys documents from short_words - 1 words up (see minhash_min_words)

KEYS_SCHEMA = pa.schema([("doc_idx", pa.int64()), ("n_words", pa.int32()), ("buckets", pa.list_(pa.uint64()))])
# The candidate join is range-partitioned on the keys (64-bit hashes, so uniform): each shard task also writes its
# (key, doc_idx) pairs sorted by key (a "pairs" part, scratch beside its output), and each join task reads one
# range of keys from every shard's pairs part.
PAIRS_SCHEMA = pa.schema([("bucket", pa.uint64()), ("doc_idx", pa.int64())])
PAIRS_ROW_GROUP = 16_384  # rows per row group of a pairs part: at most this many are read beyond a range
EDGES_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64())])
BUCKET_SPACE = 1 << 64


# ---------------------------------------------------------------------------------------------
# Core: words, shingles, MinHash, keys
# ---------------------------------------------------------------------------------------------


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (uint64 arithmetic wraps): spreads a linear combination over all 64 bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def word_hashes(texts: pl.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc (N,) int64 ascending, h (N,) uint64 word hashes in order, n_words (n_docs,) int64) of normalized words."""
    words = (
        pl.DataFrame({"text": texts.cast(pl.String)})
        .lazy()
        .with_row_index("doc")
        .select("doc", w=pl.col("text").fill_null("").str.normalize("NFKC").str.to_lowercase()
                .str.replace_all(r"\d", "0").str.replace_all(r"[^\w\s]", "").str.extract_all(r"\w+"))
        .explode("w")
        .drop_nulls("w")
        .select(pl.col("doc").cast(pl.Int64), h=pl.col("w").hash(_WORD_SEED))
        .collect()
    )
    doc = words["doc"].to_numpy()
    return doc, words["h"].to_numpy(), np.bincount(doc, minlength=texts.len()).astype(np.int64)


def _positions(doc: np.ndarray, n_words: np.ndarray) -> np.ndarray:
    """(N,) position of each word within its document (doc ascending, n_words words each)."""
    start = np.cumsum(n_words) - n_words  # (n_docs,) first word of each doc
    return np.arange(doc.size, dtype=np.int64) - start[doc]


def shingle_sizes(n_words: np.ndarray, shingle_size: int, words_per_shingle_word: int) -> np.ndarray:
    """(n_docs,) words per shingle: min(shingle_size, max(2, W // words_per_shingle_word)), never above W."""
    n = np.clip(n_words // words_per_shingle_word, 2, max(2, shingle_size))
    return np.maximum(np.minimum(np.minimum(n, shingle_size), n_words), 1)


def shingle_hashes(doc: np.ndarray, h: np.ndarray, n_words: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(doc, shingle hash) of every run of sizes[doc] consecutive words; a document shorter than its size is one shingle."""
    if doc.size == 0:
        return doc, h
    pos = _positions(doc, n_words)
    n_tok, w_tok = sizes[doc], n_words[doc]  # (N,) per word: its document's shingle size and length
    s = h.copy()
    for k in range(1, int(sizes.max())):  # polynomial hash of the shingle's words, in order
        power = np.uint64(pow(int(_POLY), k, 2**64))
        ok = (k < n_tok) & (pos + k < w_tok)
        nxt = np.minimum(np.arange(doc.size) + k, doc.size - 1)
        s += np.where(ok, h[nxt] * power, np.uint64(0))
    keep = (pos + n_tok <= w_tok) | ((pos == 0) & (w_tok < n_tok))
    s = _mix64(s[keep] + n_tok[keep].astype(np.uint64) * _SHINGLE_SALT)  # shingles of different sizes never meet
    return doc[keep], s


def minhash_params(permutations: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) (permutations,) uint64 of the hash family h(x) = (a x + b) mod 2^64 >> 32, a odd; seeded."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64, permutations, dtype=np.uint64, endpoint=False) | np.uint64(1)
    b = rng.integers(0, 2**64, permutations, dtype=np.uint64, endpoint=False)
    return a, b


def minhash_signatures(doc: np.ndarray, shingles: np.ndarray, n_docs: int, a: np.ndarray,
                       b: np.ndarray) -> np.ndarray:
    """(n_docs, permutations) uint32 MinHash of each document's shingle set; documents without shingles get 2^32 - 1.

    Dietzfelbinger's multiply-add-shift hash of the 32-bit folded shingle hash, one permutation
    at a time over the contiguous shingle array (2.6x faster than a (shingles, permutations)
    block with the same arithmetic, measured), minimum per document by reduceat.
    """
    sig = np.full((n_docs, a.size), np.iinfo(np.uint32).max, dtype=np.uint32)
    if doc.size == 0:
        return sig
    x = (shingles >> _U32) ^ (shingles & np.uint64(0xFFFFFFFF))  # (S,) 32-bit keys
    starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])  # doc ascending: one run per document
    owners = doc[starts]
    tmp = np.empty(x.size, dtype=np.uint64)
    for i in range(a.size):
        np.multiply(x, a[i], out=tmp)
        tmp += b[i]
        tmp >>= _U32
        sig[owners, i] = np.minimum.reduceat(tmp, starts)
    return sig


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n_docs, bands) uint64: a hash of each band's `rows` MinHash values and the band's index."""
    out = np.empty((sig.shape[0], bands), dtype=np.uint64)
    for j in range(bands):
        key = np.full(sig.shape[0], (int(_BAND_SALT) * (j + 1)) % 2**64, dtype=np.uint64)
        for r in range(rows):
            key = _mix64(key ^ sig[:, j * rows + r].astype(np.uint64))
        out[:, j] = key
    return out


def edit_keys(doc: np.ndarray, h: np.ndarray, n_words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(doc, key): the hash of each document's word sequence and of every sequence with one word deleted.

    Two documents share a key exactly when one word substitution, insertion or deletion turns one
    into the other (up to 64-bit hash collisions). Sequence hash: sum of h_k P^k (mod 2^64) plus
    the length; deleting word i is prefix(i) + (total - prefix(i + 1)) / P, P odd so invertible.
    """
    if doc.size == 0:
        return doc, h
    pos = _positions(doc, n_words)
    power = _pow(pos)
    terms = h * power  # (N,) h_k P^k
    csum = np.cumsum(terms, dtype=np.uint64)  # wraps modulo 2^64, as intended
    start = np.cumsum(n_words) - n_words
    has = n_words > 0
    before = np.zeros(n_words.size, dtype=np.uint64)  # (n_docs,) cumsum before each doc's first word
    nz = has & (start > 0)
    before[nz] = csum[start[nz] - 1]
    upto = csum - before[doc]  # (N,) sum over k <= i
    total = np.zeros(n_words.size, dtype=np.uint64)
    total[has] = csum[start[has] + n_words[has] - 1] - before[has]
    length = n_words.astype(np.uint64)
    deleted = (upto - terms) + (total[doc] - upto) * _POLY_INV
    del_keys = _mix64(deleted + (length[doc] - np.uint64(1)) * _GOLDEN) ^ _EDIT_SALT
    full_docs = np.flatnonzero(has)
    full_keys = _mix64(total[full_docs] + length[full_docs] * _GOLDEN) ^ _EDIT_SALT
    return np.concatenate([doc, full_docs]), np.concatenate([del_keys, full_keys])


def _pow(e: np.ndarray) -> np.ndarray:
    """(N,) _POLY ** e modulo 2^64, by squaring."""
    out = np.ones(e.size, dtype=np.uint64)
    base = np.full(e.size, _POLY, dtype=np.uint64)
    e = e.astype(np.uint64)
    while e.any():
        odd = (e & np.uint64(1)).astype(bool)
        out[odd] *= base[odd]
        base *= base
        e >>= np.uint64(1)
    return out


def document_keys(texts: pl.Series, settings: DedupSettings, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_words (n_docs,), offsets (n_docs + 1,), keys): each document's distinct LSH band and/or one-word-edit keys
    are keys[offsets[i]:offsets[i + 1]]; none for documents below min_words (left to exact dedup)."""
    doc, h, n_words = word_hashes(texts)
    n_docs = n_words.size
    bands, rows = settings.lsh_shape()
    use_edit = (n_words >= settings.min_words) & (n_words <= settings.short_words)
    use_minhash = n_words >= minhash_min_words(settings)
    parts_doc, parts_key = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.uint64)]
    if use_edit.any():
        m = use_edit[doc]
        d, k = edit_keys(_dense(doc[m], use_edit), h[m], n_words[use_edit])
        parts_doc.append(np.flatnonzero(use_edit)[d])
        parts_key.append(k)
    if use_minhash.any():
        m = use_minhash[doc]
        sub_words = n_words[use_minhash]
        d, s = shingle_hashes(_dense(doc[m], use_minhash), h[m], sub_words,
                              shingle_sizes(sub_words, settings.shingle_size, settings.words_per_shingle_word))
        a, b = minhash_params(bands * rows, seed)
        keys = band_keys(minhash_signatures(d, s, int(use_minhash.sum()), a, b), bands, rows)  # (m, bands)
        parts_doc.append(np.repeat(np.flatnonzero(use_minhash), bands))
        parts_key.append(keys.ravel())
    all_doc, all_key = np.concatenate(parts_doc), np.concatenate(parts_key)
    order = np.lexsort((all_key, all_doc))
    all_doc, all_key = all_doc[order], all_key[order]
    distinct = np.r_[True, (all_doc[1:] != all_doc[:-1]) | (all_key[1:] != all_key[:-1])] if all_doc.size else all_doc
    all_doc, all_key = all_doc[distinct.astype(bool)], all_key[distinct.astype(bool)]
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(np.bincount(all_doc, minlength=n_docs), out=offsets[1:])
    return n_words, offsets, all_key


def minhash_min_words(settings: DedupSettings) -> int:
    """Fewest words of a document MinHash keys: MINHASH_OVERLAP below the one-word-edit matcher's top, so a copy
    one word longer or shorter always meets its original in one matcher."""
    if not settings.short_words:
        return settings.min_words
    return max(settings.min_words, settings.short_words - MINHASH_OVERLAP + 1)


def _dense(doc: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Renumber documents of `mask` 0..m-1 (doc ids of the selected subset, in order)."""
    return (np.cumsum(mask) - 1)[doc]


def keys_table(doc_idx: np.ndarray, n_words: np.ndarray, offsets: np.ndarray, keys: np.ndarray) -> pa.Table:
    """Arrow rows (doc_idx, n_words, buckets) for dedup_buckets."""
    return pa.table({"doc_idx": pa.array(np.asarray(doc_idx, dtype=np.int64)),
                     "n_words": pa.array(np.asarray(n_words, dtype=np.int32)),
                     "buckets": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                                         pa.array(keys, type=pa.uint64()))},
                    schema=KEYS_SCHEMA)


def keys_part(texts: pl.DataFrame, settings: DedupSettings, seed: int):
    """Arrow batches of one shard's keys from its (doc_idx, text) rows, bounded in characters like featurize."""
    series = texts["text"]
    doc_idx = texts["doc_idx"].to_numpy()
    for start, end in batch_bounds(series, max_chars=10**9):
        yield keys_table(doc_idx[start:end], *document_keys(series.slice(start, end - start), settings, seed))


# ---------------------------------------------------------------------------------------------
# Core: candidate pairs
# ---------------------------------------------------------------------------------------------


def key_pairs(keys: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(bucket uint64, doc_idx int64) of every key of keys rows (doc_idx, n_words, buckets), sorted by
    (bucket, doc_idx)."""
    lists = keys.column("buckets")
    bucket = pc.list_flatten(lists).to_numpy().astype(np.uint64, copy=False)
    doc = np.repeat(keys.column("doc_idx").to_numpy(), pc.list_value_length(lists).to_numpy())
    order = np.lexsort((doc, bucket))
    return bucket[order], doc[order]


def pairs_batches(bucket: np.ndarray, doc: np.ndarray) -> Iterator[pa.Table]:
    """A pairs part's row groups (PAIRS_SCHEMA, PAIRS_ROW_GROUP rows each), from key_pairs' sorted arrays."""
    for i in range(0, bucket.size, PAIRS_ROW_GROUP):
        yield pa.table({"bucket": bucket[i:i + PAIRS_ROW_GROUP], "doc_idx": doc[i:i + PAIRS_ROW_GROUP]},
                       schema=PAIRS_SCHEMA)


def star_edges(bucket: np.ndarray, doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate edges from (bucket, doc) pairs sorted by (bucket, doc): every document sharing a key with others,
    joined to the first of them (a star per shared key is enough for connected components). Distinct (a, b),
    a < b, sorted."""
    if bucket.size == 0:
        return doc[:0], doc[:0]
    new = np.r_[True, bucket[1:] != bucket[:-1]]  # the first (smallest doc) pair of each key
    first = doc[new][np.cumsum(new) - 1]
    keep = doc != first  # a key held by one document only joins nothing
    return distinct_edges(first[keep], doc[keep])


def distinct_edges(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (a, b) pairs, sorted by (a, b)."""
    if a.size == 0:
        return a, b
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    keep = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])]
    return a[keep], b[keep]


# ---------------------------------------------------------------------------------------------
# Core: components
# ---------------------------------------------------------------------------------------------


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected components of the graph with edges (a[i], b[i]) over document ids.

    Returns (doc, component, representative), one entry per document in some edge, sorted by
    doc: component is numbered 0.. in order of its representative, the component's smallest doc.
    """
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)  # relabel: memory ~ edges, not pool
    if nodes.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    m = a.size
    graph = sp.coo_matrix((np.ones(m, dtype=np.int8), (inverse[:m], inverse[m:])), shape=(nodes.size,) * 2)
    _, label = connected_components(graph, directed=False)
    rep_of_label = np.full(label.max() + 1, nodes.size, dtype=np.int64)
    np.minimum.at(rep_of_label, label, np.arange(nodes.size))  # nodes ascending: smallest position = smallest doc
    order = np.argsort(rep_of_label)  # components in order of their representative
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return nodes, rank[label], nodes[rep_of_label[label]]


def dropped_frame(doc: np.ndarray, component: np.ndarray, representative: np.ndarray, reason: str) -> pl.DataFrame:
    """dedup_duplicates rows: every document of a component but its representative."""
    size = np.bincount(component)[component] if component.size else component
    drop = doc != representative
    return pl.DataFrame({
        "doc_idx": doc[drop].astype(np.int64), "component": component[drop].astype(np.int64),
        "representative": representative[drop].astype(np.int64), "component_size": size[drop].astype(np.int64),
        "reason": pl.Series([reason] * int(drop.sum()), dtype=pl.String),
    })


# ---------------------------------------------------------------------------------------------
# Core: semantic dedup (SemDeDup) inside one cluster
# ---------------------------------------------------------------------------------------------


def semantic_pairs(vectors: np.ndarray, eps: float, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(i, j), i < j, rows of L2-normalized `vectors` (n, dim) with cosine similarity > 1 - eps; blocks of rows
    against all later rows, so memory is block x n, not n x n."""
    n = vectors.shape[0]
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    out_i, out_j = [], []
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        sim = x[lo:hi] @ x[lo:].T  # (hi - lo, n - lo)
        i, j = np.nonzero(sim > 1.0 - eps)
        upper = j > i  # j indexes from lo: later rows only
        out_i.append(i[upper] + lo)
        out_j.append(j[upper] + lo)
    if not out_i:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


@task(name="dedup-shard", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient_failure)
def dedup_shard(shard: Shard, input_path: str, output_path: str, settings: DedupSettings, seed: int,
                parts: Parts) -> ShardResult:
    """Key one shard: its input part (doc_idx, text) -> its output part (doc_idx, n_words, buckets)."""
    start = time.perf_counter()
    texts = pl.from_arrow(parts.read_table(input_path, columns=["doc_idx", "text"]))
    if not np.array_equal(texts["doc_idx"].to_numpy(), np.arange(shard.lo, shard.hi)):
        raise ValueError(f"input part {input_path} does not hold doc_idx {shard.lo}..{shard.hi - 1} in order")
    keys = pa.Table.from_batches([], schema=KEYS_SCHEMA) if texts.height == 0 else pa.concat_tables(
        keys_part(texts, settings, seed))
    # the pairs first: a complete output part means its pairs part is complete too
    parts.write_parquet(pairs_path(output_path), pairs_batches(*key_pairs(keys)), schema=PAIRS_SCHEMA)
    rows = parts.write_parquet(output_path, [keys], schema=KEYS_SCHEMA)
    return ShardResult(shard, output_path, rows, time.perf_counter() - start, worker_name())


def pairs_path(output_path: str) -> str:
    """Where a dedup shard task writes its pairs part, beside its output part."""
    return Parts.beside(output_path, "pairs")


@task(name="dedup-join", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient_failure)
def dedup_join(shard: Shard, input_path: str, output_path: str, pairs: tuple[str, ...], ranges: int,
               parts: Parts) -> ShardResult:
    """The candidate edges among the keys in one hash range (`shard.lo` of `ranges`) of every shard's pairs
    part (`pairs`): star_edges, written to `output_path` (EDGES_SCHEMA). `input_path` is unused."""
    start = time.perf_counter()
    lo, hi = hash_range(shard.lo, ranges, BUCKET_SPACE)
    tables = [parts.read_range(url, "bucket", lo, hi) for url in pairs]
    held = pa.concat_tables(tables) if tables else PAIRS_SCHEMA.empty_table()
    bucket, doc = held.column("bucket").to_numpy(), held.column("doc_idx").to_numpy()
    order = np.lexsort((doc, bucket))
    a, b = star_edges(bucket[order], doc[order])
    rows = parts.write_parquet(output_path, [pa.table({"a": a, "b": b}, schema=EDGES_SCHEMA)], schema=EDGES_SCHEMA)
    return ShardResult(shard, output_path, rows, time.perf_counter() - start, worker_name())


def _candidate_edges(key: str, shards: list[Shard], parts: Parts, store_path: str, run: RunSettings
                     ) -> tuple[np.ndarray, np.ndarray, int]:
    """(a, b, ranges): the partition's distinct candidate edges, found by join tasks, one per hash range of the keys.

    Each shard's pairs part is where its shard task left it; a shard kept from an earlier run whose parts are
    gone (the stage completed, or `run.parts` moved) has them rebuilt here from its kept keys part."""
    log = get_logger()
    urls, rebuilt = [], 0
    for shard in shards:
        url = pairs_path(parts.output(shard))
        if not parts.exists(url):
            kept = pq.read_table(data_part(store_path, "dedup", key, shard), columns=["doc_idx", "buckets"])
            parts.write_parquet(url, pairs_batches(*key_pairs(kept)), schema=PAIRS_SCHEMA)
            rebuilt += 1
        urls.append(url)
    if rebuilt:
        log.info(f"dedup: rebuilt the sorted keys of {rebuilt} shards from their kept parts")
    docs = sum(s.docs for s in shards)
    ranges = hash_ranges(docs, run.shard_docs)
    log.info(f"dedup: candidate join of {docs:,} documents' keys in {ranges} hash ranges")
    found_a, found_b = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    joins = [Shard("join", i, i + 1) for i in range(ranges)]
    for result in execute_shards(dedup_join, joins, parts, {"pairs": tuple(urls), "ranges": ranges}):
        edges = parts.read_table(result.path)
        found_a.append(edges.column("a").to_numpy())
        found_b.append(edges.column("b").to_numpy())
    # a pair of documents sharing keys in two ranges is found by both
    a, b = distinct_edges(np.concatenate(found_a), np.concatenate(found_b))
    return a, b, ranges


def _write(con: Any, key: str, frame: pl.DataFrame, info: dict[str, Any]) -> None:
    """One dedup partition, replaced whole: its dropped documents and its info rows."""
    rows = pl.DataFrame({"name": list(info), "value": [json.dumps(v) for v in info.values()]},
                        schema={"name": pl.String, "value": pl.String})
    with transaction(con):
        run_sql(con, "dedup_delete", {"key": key})
        insert_frame(con, "dedup_insert_duplicates", frame, {"key": key})
        insert_frame(con, "dedup_insert_info", rows, {"key": key})


def _ref(con: Any, stage: str, key: str, docs: StageRef) -> StageRef:
    return make_ref(con, stage, key, docs.store, "dedup_duplicates", ["doc_idx", "component", "representative", "reason"])


@stage_task("dedup", cache_policy=SHARDED_CACHE_POLICY)
def dedup(settings: DedupSettings, docs: StageRef, seed: int, run: RunSettings = RunSettings(),
          objectstore: ObjectStoreSettings | None = None) -> StageRef:
    """Find the pool's near-duplicate components and record every document but each component's first.

    Shard by shard (quadflow.shards): each shard task turns its documents into keys (LSH bands
    or one-word-edit hashes), kept as its output part in `<store>.data/dedup/` and read in place
    through the view dedup_buckets. Candidate pairs (documents sharing a key) are found by join
    tasks, one per hash range of the keys (dedup_join), and their connected components are
    computed here, over the candidate edges only.
    """
    key = stage_key("dedup", VERSION, settings, docs, seed)
    log = get_logger()
    start = time.perf_counter()
    with connect(docs.store) as con:
        drop_loaded_table(con, "dedup", "dedup_buckets")
        run_sql(con, "dedup_create")
        n_pool = role_counts(con, docs.key)["pool"]
        bands, rows = settings.lsh_shape()
        info: dict[str, Any] = {"version": VERSION, "enabled": settings.enabled, "docs_key": docs.key,
                                "pool_docs": n_pool, "bands": bands, "rows": rows,
                                "lsh_threshold": round((1 / bands) ** (1 / rows), 4)}
        parts = None
        if not settings.enabled or n_pool == 0:
            frame = dropped_frame(*(np.zeros(0, dtype=np.int64),) * 3, REASON_NEAR)
        else:
            parts = stage_parts(run, docs.store.path, "dedup", key, objectstore)
            parts.check()
            progress = Progress("dedup", n_pool)
            texts = text_parts(run, docs.store.path, docs.key, objectstore)
            shards = plan_shards({"pool": n_pool}, run.shard_docs)
            forget_unusable_shards(con, "dedup", key, shards, docs.store.path)
            stats = run_shards(con, "dedup", key, shards, parts, export_texts(con, docs.key, texts), dedup_shard,
                               {"settings": settings, "seed": seed}, keep_outputs("dedup", key, parts, docs.store.path),
                               progress, inputs=texts)
            progress.close()
            log.info(f"dedup: {stats.summary()}")
            with transaction(con):
                point_views(con, "dedup", "dedup_views", docs.store.path)
            a, b, ranges = _candidate_edges(key, shards, parts, docs.store.path, run)
            doc, comp, rep = components(a, b)
            frame = dropped_frame(doc, comp, rep, REASON_NEAR)
            methods = dict(query_sql(con, "dedup_methods", {"key": key, "lo_minhash": minhash_min_words(settings),
                                                            "min_words": settings.min_words,
                                                            "short_words": settings.short_words}).fetchall())
            info.update(candidate_edges=int(a.size), components=int(np.unique(comp).size),
                        docs_in_components=int(doc.size), shards=stats.total, join_ranges=ranges, **methods)
        info.update(dropped=frame.height, seconds=round(time.perf_counter() - start, 3))
        _write(con, key, frame, info)
        ref = _ref(con, "dedup", key, docs)
    if parts is not None:
        parts.clean()
    log.info(f"dedup: {frame.height:,} of {n_pool:,} pool documents are near duplicates of a kept one"
             + ("" if settings.enabled else " (dedup.enabled is false)"))
    return ref


SEMANTIC_BATCH_DOCS = 200_000  # vectors read per query: whole clusters, at most about this many documents


@stage_task("semdedup")
def semdedup(settings: DedupSettings, near: StageRef, features: StageRef, clusters: StageRef) -> StageRef:
    """SemDeDup inside each k-means cluster (when dedup.semantic is on): documents above 1 - eps cosine
    similarity are one component, the first by doc_idx is kept; fuzzy dedup's drops take no part."""
    key = stage_key("semdedup", SEMANTIC_VERSION, settings.semantic, settings.semantic_eps, near, features, clusters)
    log = get_logger()
    start = time.perf_counter()
    info: dict[str, Any] = {"version": SEMANTIC_VERSION, "enabled": settings.semantic, "eps": settings.semantic_eps,
                            "near_key": near.key, "features_key": features.key, "clusters_key": clusters.key}
    with connect(near.store) as con:
        run_sql(con, "dedup_create")
        frames = []
        pairs = n_components = 0
        if settings.semantic:
            sizes = query_sql(con, "dedup_cluster_sizes", {"clusters_key": clusters.key, "near_key": near.key}).fetchnumpy()
            for lo, hi in _cluster_batches(np.asarray(sizes["cluster"]), np.asarray(sizes["docs"]), SEMANTIC_BATCH_DOCS):
                table = query_sql(con, "dedup_cluster_vectors", {
                    "clusters_key": clusters.key, "features_key": features.key, "near_key": near.key,
                    "lo": int(lo), "hi": int(hi)}).fetch_arrow_table()
                frame, n = semantic_batch(table, settings.semantic_eps, offset=n_components)
                frames.append(frame)
                pairs += n
                n_components += frame["component"].n_unique()
        frame = pl.concat(frames) if frames else dropped_frame(*(np.zeros(0, dtype=np.int64),) * 3, REASON_SEMANTIC)
        info.update(pairs=pairs, components=n_components, dropped=frame.height, seconds=round(time.perf_counter() - start, 3))
        _write(con, key, frame, info)
        ref = _ref(con, "semdedup", key, near)
    if settings.semantic:
        log.info(f"semdedup: {frame.height:,} pool documents dropped (cosine similarity > {1 - settings.semantic_eps:g} "
                 f"to a kept one in their cluster)")
    return ref


def _cluster_batches(cluster: np.ndarray, docs: np.ndarray, max_docs: int):
    """[lo, hi) cluster id ranges holding about max_docs documents each (a bigger cluster alone)."""
    lo, total = None, 0
    for c, n in zip(cluster.tolist(), docs.tolist()):
        if lo is None:
            lo = c
        elif total + n > max_docs:
            yield lo, c
            lo, total = c, 0
        total += n
    if lo is not None:
        yield lo, int(cluster[-1]) + 1


def semantic_batch(table: pa.Table, eps: float, offset: int = 0) -> tuple[pl.DataFrame, int]:
    """dedup_duplicates rows of the clusters in `table` (cluster, doc_idx, vec; by cluster, doc_idx), components
    numbered from `offset`, and the number of pairs above the threshold."""
    if table.num_rows == 0:
        return dropped_frame(*(np.zeros(0, dtype=np.int64),) * 3, REASON_SEMANTIC), 0
    cluster = table.column("cluster").to_numpy()
    doc_idx = table.column("doc_idx").to_numpy()
    vec = table.column("vec").combine_chunks()
    dim = len(vec[0])
    x = np.asarray(vec.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
    bounds = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1], True])
    a, b = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        i, j = semantic_pairs(x[lo:hi], eps)
        a.append(doc_idx[lo:hi][i])
        b.append(doc_idx[lo:hi][j])
    a, b = np.concatenate(a), np.concatenate(b)
    doc, comp, rep = components(a, b)
    return dropped_frame(doc, comp + offset, rep, REASON_SEMANTIC), int(a.size)
