"""Featurize: hashed word 1-2-gram counts and dense LSA vectors for every document.

One tokenization pass per batch gives two feature spaces. Each n-gram is hashed once to a
64-bit value (polars' seeded hash, in Rust and multithreaded) and reduced modulo each space:
`n_features` buckets (2^18 by default) feed TF-IDF -> truncated SVD for the clustering
vectors, and `dsir_buckets` (10k, as in DSIR) are stored per document for the DSIR scorer,
the classifier and the KL metric. Hashing directly into each space keeps both uniform
(folding 2^18 columns onto 10k would give some buckets 27 sources and others 26).

polars' hash is stable within a polars version, not across versions, so the polars version
is part of VERSION and therefore of the stage key: an upgrade recomputes, never mixes spaces.
Measured against sklearn's HashingVectorizer (Python regex, one core) this path is about 2x
faster on the Debian pool on 2 cores, so it is the one kept.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import sklearn
from sklearn.decomposition import TruncatedSVD
from sklearn.preprocessing import normalize
from prefect import task
from prefect.cache_policies import NO_CACHE
from threadpoolctl import threadpool_limits

from quadflow.log import Progress, get_logger
from quadflow.settings import FeaturizeSettings, RunSettings
from quadflow.objectstore import ObjectStoreSettings
from quadflow.shards import (Parts, Shard, ShardResult, data_part, drop_loaded_table, export_texts,
                             forget_unusable_shards, keep_outputs, plan_shards, point_views, run_shards, shard_infos,
                             stage_parts, text_parts, worker_name)
from quadflow.store import StageRef, connect, insert_frame, make_ref, query_sql, run_sql, stage_key, transaction
from quadflow.tasking import SHARDED_CACHE_POLICY, stage_task, transient_failure

VERSION = f"featurize-3/polars-{pl.__version__}/sklearn-{sklearn.__version__}"

# Fixed seeds of the n-gram hash: the feature space must not move with the run's seed,
# or pool and target counts from different runs would not be comparable.
_UNIGRAM_SEED = 0x51AD
_BIGRAM_SEED = 0xF10E
WORD_PATTERN = r"\w+"  # Unicode word runs, matched after lower-casing
_MAX_COUNT = 65_535  # counts are stored as USMALLINT

# A batch holds at most this many documents and this many (truncated) characters, so a run of
# long manuals costs no more memory than a run of dictionary entries (the whole stage peaked at
# 1.7 GB RSS on the 354k-document Debian pool).
BATCH_DOCS = 50_000
BATCH_CHARS = 25_000_000


# ---------------------------------------------------------------------------------------------
# Core: hashed n-grams
# ---------------------------------------------------------------------------------------------


def _as_series(texts: Sequence[str] | pl.Series) -> pl.Series:
    if isinstance(texts, pl.Series):
        return texts.cast(pl.String)
    return pl.Series("text", list(texts), dtype=pl.String)


def _ngram_hashes(texts: pl.Series, max_chars: int) -> pl.DataFrame:
    """One row per unigram and bigram occurrence: doc (row in `texts`), h (64-bit hash)."""
    tokens = (
        pl.DataFrame({"text": texts})
        .lazy()
        .with_row_index("doc")
        .select(
            "doc",
            tok=pl.col("text").str.slice(0, max_chars).str.to_lowercase().str.extract_all(WORD_PATTERN),
        )
        .explode("tok")
        .drop_nulls("tok")  # empty documents explode to one null token
        .select("doc", h=pl.col("tok").hash(_UNIGRAM_SEED))
        .with_columns(h_next=pl.col("h").shift(-1), doc_next=pl.col("doc").shift(-1))
    )
    unigrams = tokens.select("doc", "h")
    bigrams = tokens.filter(pl.col("doc_next") == pl.col("doc")).select(
        "doc", h=pl.struct("h", "h_next").hash(_BIGRAM_SEED)
    )
    return pl.concat([unigrams, bigrams]).collect()


def _counts_csr(hashes: pl.DataFrame, n_docs: int, n_buckets: int) -> sp.csr_matrix:
    """Count (doc, h % n_buckets) pairs into a canonical CSR (sorted columns, no duplicates)."""
    # Sort + run-length encode is ~4x cheaper than group_by + sort here (measured on the pool).
    cells = (
        hashes.lazy()
        .select(cell=(pl.col("doc").cast(pl.UInt64) * n_buckets + pl.col("h") % n_buckets).sort().rle())
        .unnest("cell")
        .collect()
    )
    cell = cells["value"].to_numpy().astype(np.int64)  # (nnz,) doc * n_buckets + bucket, ascending
    rows = cell // n_buckets
    cols = (cell - rows * n_buckets).astype(np.int32)
    indptr = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_docs), out=indptr[1:])
    data = cells["len"].to_numpy().astype(np.float32)
    return sp.csr_matrix((data, cols, indptr), shape=(n_docs, n_buckets))


def hashed_ngram_spaces(
    texts: Sequence[str] | pl.Series,
    spaces: Sequence[int],
    max_chars: int,
    batch_docs: int = BATCH_DOCS,
    batch_chars: int = BATCH_CHARS,
) -> list[sp.csr_matrix]:
    """Counts of lower-cased word unigrams + bigrams in several hashed spaces from one tokenization.

    Returns one float32 CSR (n_docs, n_buckets) per entry of `spaces` (exact counts below 2^24);
    only the first `max_chars` characters of each document count. Bigrams never cross
    documents. Texts are tokenized in batches of at most batch_docs docs / ~batch_chars chars.
    """
    for n in spaces:
        if not 1 <= n <= 2**31 - 1:
            raise ValueError(f"n_buckets must be in [1, 2**31 - 1], got {n!r}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars!r}")
    series = _as_series(texts)
    parts: list[list[sp.csr_matrix]] = [[] for _ in spaces]
    for start, end in batch_bounds(series, max_chars, batch_docs, batch_chars):
        chunk = series.slice(start, end - start)
        hashes = _ngram_hashes(chunk, max_chars)
        for i, n in enumerate(spaces):
            parts[i].append(_counts_csr(hashes, end - start, n))
    out = []
    for n, mats in zip(spaces, parts):
        if not mats:
            out.append(sp.csr_matrix((0, n), dtype=np.float32))
        elif len(mats) == 1:
            out.append(mats[0])
        else:
            out.append(sp.vstack(mats, format="csr"))
    return out


def hashed_ngrams(texts: Sequence[str] | pl.Series, n_buckets: int, max_chars: int) -> sp.csr_matrix:
    """Float32 CSR (n_docs, n_buckets) of lower-cased word unigram + bigram counts, hashed."""
    return hashed_ngram_spaces(texts, [n_buckets], max_chars)[0]


def batch_bounds(
    texts: pl.Series, max_chars: int, max_docs: int = BATCH_DOCS, max_batch_chars: int = BATCH_CHARS
) -> Iterator[tuple[int, int]]:
    """[start, end) row ranges of at most max_docs documents and ~max_batch_chars truncated chars."""
    n = texts.len()
    if n == 0:
        return
    lengths = texts.str.len_chars().fill_null(0).clip(upper_bound=max_chars).to_numpy()
    cum = np.cumsum(lengths, dtype=np.int64)  # (n,) chars up to and including each doc
    start = 0
    while start < n:
        before = cum[start - 1] if start else 0
        end = int(np.searchsorted(cum, before + max_batch_chars, side="right"))
        end = max(start + 1, min(end, start + max_docs, n))
        yield start, end
        start = end


# ---------------------------------------------------------------------------------------------
# Core: TF-IDF -> truncated SVD
# ---------------------------------------------------------------------------------------------


def sample_rows(n: int, sample: int, random_state: int | None) -> np.ndarray:
    """Sorted row indices of a seeded sample of at most `sample` of `n` rows (all rows if n <= sample)."""
    if n <= sample:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(random_state)
    return np.sort(rng.choice(n, size=sample, replace=False))


def _l2_normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)  # zero rows stay zero
    return x


class LSA:
    """Latent semantic vectors: sublinear TF-IDF -> truncated SVD -> L2 norm, fitted on a sample.

    Fitting on a seeded sample of at most `sample` documents keeps the cost flat in the pool
    size; idf comes from the same sample. TF-IDF rows are L2-normalized before the SVD so long
    manuals do not dominate the components. When the sample has rank below `dim`, the missing
    components are zero, so vectors always have `dim` columns.
    """

    def __init__(self, dim: int = 64, sample: int = 20_000, random_state: int | None = 0):
        self.dim = dim
        self.sample = sample
        self.random_state = random_state

    def fit(self, counts: sp.spmatrix) -> "LSA":
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim!r}")
        if self.sample < 1:
            raise ValueError(f"sample must be >= 1, got {self.sample!r}")
        counts = sp.csr_matrix(counts)
        n_docs, n_features = counts.shape
        if n_docs == 0:
            raise ValueError("cannot fit LSA on 0 documents")
        rows = sample_rows(n_docs, self.sample, self.random_state)
        x = counts[rows]
        x.eliminate_zeros()
        df = np.bincount(x.indices, minlength=n_features)  # (n_features,) docs containing each bucket
        n = x.shape[0]
        self.n_features_in_ = n_features
        self.n_fit_docs_ = n
        self.idf_ = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)  # sklearn's smooth idf
        tfidf = self._tfidf(x)
        self.components_ = np.zeros((self.dim, n_features), dtype=np.float32)  # (dim, n_features)
        self.explained_variance_ratio_ = np.zeros(self.dim, dtype=np.float64)
        if tfidf.nnz == 0:  # no document in the sample has a word: every vector is zero
            return self
        rank = min(self.dim, n, n_features)
        svd = TruncatedSVD(n_components=rank, algorithm="randomized", random_state=self.random_state)
        # One BLAS thread: on 2 busy cores it used 40% less CPU (measured on the Debian pool), and
        # the result no longer depends on the machine's thread count.
        # A sample without variance (one document, or copies of one) has no explained share: sklearn divides
        # 0 by 0 there; it is recorded as 0, not NaN.
        with threadpool_limits(limits=1), np.errstate(invalid="ignore", divide="ignore"):
            svd.fit(tfidf)
        got = svd.components_.shape[0]
        self.components_[:got] = svd.components_
        self.explained_variance_ratio_[:got] = np.nan_to_num(svd.explained_variance_ratio_, nan=0.0)
        return self

    def transform(self, counts: sp.spmatrix) -> np.ndarray:
        """Float32 (n_docs, dim) vectors, rows L2-normalized (documents with no n-grams stay zero)."""
        if not hasattr(self, "components_"):
            raise RuntimeError("LSA is not fitted: call fit() first")
        counts = sp.csr_matrix(counts)
        if counts.shape[1] != self.n_features_in_:
            raise ValueError(
                f"counts have {counts.shape[1]} columns, LSA was fitted on {self.n_features_in_}"
            )
        tfidf = self._tfidf(counts)
        out = np.asarray(tfidf @ self.components_.T, dtype=np.float32)  # (n_docs, dim)
        return _l2_normalize_rows(out)

    def fit_transform(self, counts: sp.spmatrix) -> np.ndarray:
        return self.fit(counts).transform(counts)

    def save(self, path: Path) -> None:
        """Write the fitted state to `path` (.npz) via a temporary file, so shard tasks anywhere can load it."""
        if not hasattr(self, "components_"):
            raise RuntimeError("LSA is not fitted: call fit() first")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, params=np.array([self.dim, self.sample, -1 if self.random_state is None else self.random_state,
                                              self.n_features_in_, self.n_fit_docs_], dtype=np.int64),
                         idf=self.idf_, components=self.components_, evr=self.explained_variance_ratio_)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # a failed write (full disk) must not leave a partial file of ~100 MB

    @classmethod
    def load(cls, path: Path) -> "LSA":
        """An LSA with the fitted state `save` wrote."""
        with np.load(path) as z:
            dim, sample, seed, n_features, n_fit = (int(v) for v in z["params"])
            lsa = cls(dim, sample, None if seed == -1 else seed)
            lsa.n_features_in_, lsa.n_fit_docs_ = n_features, n_fit
            lsa.idf_, lsa.components_, lsa.explained_variance_ratio_ = z["idf"], z["components"], z["evr"]
        return lsa

    def _tfidf(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        """Sublinear tf (1 + ln count) times idf, rows L2-normalized; float32 CSR."""
        x = counts.astype(np.float32, copy=True)
        x.eliminate_zeros()
        np.log(x.data, out=x.data)
        x.data += 1.0
        x.data *= self.idf_[x.indices]
        return normalize(x, norm="l2", copy=False)  # zero rows stay zero


# ---------------------------------------------------------------------------------------------
# Arrow conversion (pure) and store helpers
# ---------------------------------------------------------------------------------------------


def vectors_batch(doc_idx: np.ndarray, vectors: np.ndarray) -> pa.Table:
    """Arrow batch (doc_idx int64, vec fixed_size_list<float32>[dim]) for insertion."""
    vec = np.ascontiguousarray(vectors, dtype=np.float32)
    flat = pa.array(vec.reshape(-1))
    return pa.table(
        {
            "doc_idx": pa.array(np.asarray(doc_idx, dtype=np.int64)),
            "vec": pa.FixedSizeListArray.from_arrays(flat, vec.shape[1]),
        }
    )


def ngrams_batch(doc_idx: np.ndarray, counts: sp.csr_matrix) -> pa.Table:
    """Arrow batch (doc_idx, buckets list<uint16>, counts list<uint16>) from a canonical CSR."""
    if counts.shape[1] > _MAX_COUNT + 1:
        raise ValueError(f"{counts.shape[1]} buckets do not fit USMALLINT (at most {_MAX_COUNT + 1})")
    counts = sp.csr_matrix(counts)
    counts.sum_duplicates()  # also sorts indices ascending within each row
    offsets = pa.array(counts.indptr.astype(np.int32))
    buckets = pa.array(counts.indices.astype(np.uint16))
    values = pa.array(np.minimum(counts.data, _MAX_COUNT).astype(np.uint16))
    return pa.table(
        {
            "doc_idx": pa.array(np.asarray(doc_idx, dtype=np.int64)),
            "buckets": pa.ListArray.from_arrays(offsets, buckets),
            "counts": pa.ListArray.from_arrays(offsets, values),
        }
    )


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (n+1,) starting at 0, flat values) of a list column, without a Python row loop."""
    col = table.column(name).combine_chunks()  # one ListArray
    if col.null_count:
        raise ValueError(f"column {name!r} has {col.null_count} null rows")
    offsets = np.asarray(col.offsets, dtype=np.int64)
    values = col.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


def _check_dense(doc_idx: np.ndarray, what: str) -> None:
    if len(doc_idx) and (doc_idx[0] != 0 or doc_idx[-1] != len(doc_idx) - 1):
        raise ValueError(f"{what}: doc_idx is not dense 0..{len(doc_idx) - 1} (last is {doc_idx[-1]})")


def load_vectors(con: Any, key: str, role: str) -> np.ndarray:
    """Float32 (n, dim) vectors of one featurize partition and role, row i = doc_idx i."""
    table = query_sql(con, "featurize_vectors_load", {"key": key, "role": role}).fetch_arrow_table()
    _check_dense(table.column("doc_idx").to_numpy(), f"featurize_vectors {key}/{role}")
    n = table.num_rows
    if n == 0:
        info = query_sql(con, "featurize_info_load", {"key": key}).fetchone()
        return np.zeros((0, int(info[1]) if info else 0), dtype=np.float32)
    offsets, values = _list_column(table, "vec")
    dim = int(offsets[1])
    if len(values) != n * dim:
        raise ValueError(f"featurize_vectors {key}/{role}: rows do not all have {dim} dims")
    return np.ascontiguousarray(values.astype(np.float32, copy=False).reshape(n, dim))


def featurize_space(con: Any, key: str) -> tuple[int, int]:
    """(dsir_buckets, max_chars) of a featurize partition: the n-gram space its counts are in and the
    prefix of each text they count, for readers that do not carry the featurize settings."""
    info = query_sql(con, "featurize_info_load", {"key": key}).fetchone()
    if info is None:
        raise ValueError(f"no featurize_info row for key {key!r}: was featurize run?")
    return int(info[0]), int(info[2])


def load_ngrams(con: Any, key: str, role: str, n_buckets: int | None = None) -> sp.csr_matrix:
    """Float32 CSR (n, n_buckets) of DSIR-space counts, row i = doc_idx i.

    n_buckets defaults to the `dsir_buckets` recorded in featurize_info for this key, so
    readers need not carry the featurize settings.
    """
    if n_buckets is None:
        n_buckets, _ = featurize_space(con, key)
    table = query_sql(con, "featurize_ngrams_load", {"key": key, "role": role}).fetch_arrow_table()
    _check_dense(table.column("doc_idx").to_numpy(), f"featurize_ngrams {key}/{role}")
    n = table.num_rows
    if n == 0:
        return sp.csr_matrix((0, n_buckets), dtype=np.float32)
    indptr, buckets = _list_column(table, "buckets")
    _, counts = _list_column(table, "counts")
    return sp.csr_matrix(
        (counts.astype(np.float32), buckets.astype(np.int32), indptr), shape=(n, n_buckets)
    )


def role_counts(con: Any, key: str) -> dict[str, int]:
    """Documents per role of an ingest partition (pool first), checked to be indexed 0..n-1."""
    out = {"pool": 0, "target": 0}
    for role, docs, lo, hi in query_sql(con, "score_count_docs", {"key": key}).fetchall():
        if (lo, hi) != (0, docs - 1):
            raise ValueError(f"ingest_docs {key}/{role}: doc_idx is not dense (spans {lo}..{hi} for {docs} documents)")
        out[role] = int(docs)
    return out


def token_weighted_sample(con: Any, key: str, n: int, seed: int) -> np.ndarray:
    """Sorted doc_idx of `n` pool documents drawn without replacement in proportion to their tokens (seeded).

    All documents with tokens when the pool has at most `n` of them; documents without tokens never.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    got = query_sql(con, "featurize_sample_tokens", {"key": key, "n": int(n), "seed": int(seed)}).fetchnumpy()
    return np.asarray(got["doc_idx"], dtype=np.int64)


def _sample_texts(con: Any, key: str, idx: np.ndarray, max_chars: int) -> pl.Series:
    """The first `max_chars` characters of the pool documents `idx` (sorted), in that order."""
    cols = query_sql(con, "featurize_texts_at", {"key": key, "role": "pool", "idx": idx.tolist(),
                                                 "max_chars": int(max_chars)}).fetch_arrow_table()
    got = cols.column("doc_idx").to_numpy()
    if not np.array_equal(got, idx):
        raise ValueError(f"ingest_docs {key}/pool lacks sampled documents (wanted {idx.size}, got {got.size})")
    return pl.from_arrow(cols.column("text")).alias("text")


def _fitted_lsa(con: Any, settings: FeaturizeSettings, docs_key: str, n_pool: int, seed: int, parts: Parts,
                url: str) -> LSA:
    """The LSA of this partition: loaded when an earlier (killed) run saved it, else fitted on a sample and saved."""
    log = get_logger()
    if parts.exists(url):
        lsa = LSA.load(parts.local(url))
        log.info(f"featurize: reusing the LSA fitted by an earlier run ({url})")
        return lsa
    if settings.svd_sample_by == "tokens":
        sample = token_weighted_sample(con, docs_key, settings.svd_sample, seed)
        if sample.size == 0:
            raise ValueError(f"ingest_docs {docs_key}/pool: no document has tokens, so featurize.svd_sample_by = "
                             "'tokens' has nothing to draw; use 'docs'")
    else:
        sample = sample_rows(n_pool, settings.svd_sample, seed)
    counts = hashed_ngrams(_sample_texts(con, docs_key, sample, settings.max_chars), settings.n_features,
                           settings.max_chars)
    lsa = LSA(settings.dim, settings.svd_sample, seed).fit(counts)
    parts.save(url, lsa.save)
    log.info(
        f"featurize: LSA fitted on {lsa.n_fit_docs_:,} pool docs (drawn by {settings.svd_sample_by}), "
        f"dim {settings.dim}, explained variance {lsa.explained_variance_ratio_.sum():.3f}"
    )
    return lsa


def featurize_part(texts: pl.DataFrame, settings: FeaturizeSettings, lsa: LSA) -> Iterator[pa.Table]:
    """Arrow batches (doc_idx, vec, buckets, counts) of one shard's texts (doc_idx, text), bounded in size."""
    spaces = (settings.n_features, settings.dsir_buckets)
    series = texts["text"]
    doc_idx = texts["doc_idx"].to_numpy()
    for start, end in batch_bounds(series, settings.max_chars):
        big, small = hashed_ngram_spaces(series.slice(start, end - start), spaces, settings.max_chars)
        idx = doc_idx[start:end]
        vec = vectors_batch(idx, lsa.transform(big))
        ngr = ngrams_batch(idx, small)
        yield pa.table({"doc_idx": vec.column("doc_idx"), "vec": vec.column("vec"),
                        "buckets": ngr.column("buckets"), "counts": ngr.column("counts")})


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


@task(name="featurize-shard", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient_failure)
def featurize_shard(shard: Shard, input_path: str, output_path: str, settings: FeaturizeSettings,
                    lsa_path: str, parts: Parts) -> ShardResult:
    """Featurize one shard: its input part (doc_idx, text) -> its output part (doc_idx, vec, buckets, counts)."""
    start = time.perf_counter()
    texts = pl.from_arrow(parts.read_table(input_path, columns=["doc_idx", "text"]))
    if not np.array_equal(texts["doc_idx"].to_numpy(), np.arange(shard.lo, shard.hi)):
        raise ValueError(f"input part {input_path} does not hold doc_idx {shard.lo}..{shard.hi - 1} in order")
    lsa = LSA.load(parts.local(lsa_path))
    totals = np.zeros(settings.dsir_buckets, dtype=np.float64)

    def counted(batches: Iterator[pa.Table]) -> Iterator[pa.Table]:
        for batch in batches:
            totals[:] += ngram_totals(batch, settings.dsir_buckets)
            yield batch

    rows = parts.write_parquet(output_path, counted(featurize_part(texts, settings, lsa)))
    return ShardResult(shard, output_path, rows, time.perf_counter() - start, worker_name(),
                       info=totals_info(shard.role, totals))


def ngram_totals(table: pa.Table, n_buckets: int) -> np.ndarray:
    """(n_buckets,) float64 sums of a part's stored n-gram counts (clipped as stored; exact below 2^53)."""
    _, buckets = _list_column(table, "buckets")
    _, counts = _list_column(table, "counts")
    return np.bincount(buckets.astype(np.int64), weights=counts.astype(np.float64), minlength=n_buckets)


def totals_info(role: str, totals: np.ndarray) -> dict[str, Any]:
    """A shard's n-gram totals as its ledger keeps them (JSON): only the buckets that occur."""
    nz = np.flatnonzero(totals)
    return {"role": role, "buckets": nz.tolist(), "totals": totals[nz].astype(np.int64).tolist()}


def _keep_part(key: str, parts: Parts, store_path: str, n_buckets: int):
    """run_shards' load: keep the part as the partition's data; the ledger keeps its n-gram totals (summed here
    from the kept part when a killed run finished it, since its task's result was lost)."""
    keep = keep_outputs("featurize", key, parts, store_path)

    def load(con: Any, result: ShardResult) -> str:
        keep(con, result)
        info = result.info
        if info is None:  # read the local kept copy: an s3:// part is not downloaded a second time
            kept = data_part(store_path, "featurize", key, result.shard)
            table = pq.read_table(kept, columns=["buckets", "counts"])
            info = totals_info(result.shard.role, ngram_totals(table, n_buckets))
        return json.dumps(info)
    return load


def _write_totals(con: Any, key: str, n_buckets: int) -> None:
    """featurize_totals of the partition: every shard's totals from the ledger, summed per role."""
    sums: dict[str, np.ndarray] = {}
    for text in shard_infos(con, "featurize", key):
        info = json.loads(text)
        out = sums.setdefault(info["role"], np.zeros(n_buckets, dtype=np.int64))
        np.add.at(out, np.asarray(info["buckets"], dtype=np.int64), np.asarray(info["totals"], dtype=np.int64))
    run_sql(con, "featurize_totals_delete", {"key": key})
    for role, totals in sums.items():
        nz = np.flatnonzero(totals)
        insert_frame(con, "featurize_totals_insert", pa.table({"bucket": pa.array(nz.astype(np.int32)),
                                                               "total": pa.array(totals[nz])}),
                     {"key": key, "role": role})


@stage_task("featurize", cache_policy=SHARDED_CACHE_POLICY)
def featurize(settings: FeaturizeSettings, docs: StageRef, seed: int, run: RunSettings = RunSettings(),
              objectstore: ObjectStoreSettings | None = None) -> StageRef:
    """Write LSA vectors and DSIR-space n-gram counts for the pool and target of an ingest partition.

    Shard by shard (quadflow.shards): the LSA is fitted here on a seeded sample, each shard is
    featurized by a shard task on the flow's task runner, and its output part is kept as it is in
    `<store>.data/featurize/`, which the views featurize_vectors and featurize_ngrams read in place.
    """
    key = stage_key("featurize", VERSION, settings, docs, seed)
    log = get_logger()
    with connect(docs.store) as con:
        for table in ("featurize_vectors", "featurize_ngrams"):
            drop_loaded_table(con, "featurize", table)
        run_sql(con, "featurize_create")
        counts = role_counts(con, docs.key)
        if counts["pool"] == 0:
            raise ValueError(f"ingest partition {docs.key!r} has no pool documents to featurize")
        parts = stage_parts(run, docs.store.path, "featurize", key, objectstore)
        parts.check()
        lsa_path = parts.url("lsa.npz")
        lsa = _fitted_lsa(con, settings, docs.key, counts["pool"], seed, parts, lsa_path)
        shards = plan_shards(counts, run.shard_docs)
        forget_unusable_shards(con, "featurize", key, shards, docs.store.path)
        progress = Progress("featurize", sum(counts.values()))
        texts = text_parts(run, docs.store.path, docs.key, objectstore)
        stats = run_shards(con, "featurize", key, shards, parts, export_texts(con, docs.key, texts), featurize_shard,
                           {"settings": settings, "lsa_path": lsa_path},
                           _keep_part(key, parts, docs.store.path, settings.dsir_buckets),
                           progress, inputs=texts)
        progress.close()
        log.info(f"featurize: {stats.summary()}")
        with transaction(con):
            point_views(con, "featurize", "featurize_views", docs.store.path)
            _write_totals(con, key, settings.dsir_buckets)
            run_sql(con, "featurize_info_delete", {"key": key})
            run_sql(
                con,
                "featurize_info_insert",
                {
                    "key": key,
                    "version": VERSION,
                    "n_features": settings.n_features,
                    "dsir_buckets": settings.dsir_buckets,
                    "dim": settings.dim,
                    "max_chars": settings.max_chars,
                    "svd_docs": lsa.n_fit_docs_,
                    "explained_variance": float(lsa.explained_variance_ratio_.sum()),
                    "pool_docs": counts["pool"],
                    "target_docs": counts["target"],
                },
            )
        ref = make_ref(con, "featurize", key, docs.store, "featurize_vectors", ["role", "doc_idx", "vec"])
    parts.clean()
    return ref
