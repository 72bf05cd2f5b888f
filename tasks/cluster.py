"""Cluster: k-means over the pool's LSA vectors and the centroid-neighbour graph of the bandit.

Quad (ICLR 2025) clusters the pool with k-means and treats each cluster as a bandit arm; a
reward is shared with clusters whose centroids lie within cosine distance gamma. Vectors are
L2-normalized, so Euclidean k-means on them is close to spherical k-means; labels are the most
cosine-similar normalized k-means center, and a cluster's centroid is the normalized mean of
its members, so labels, distances and the neighbour graph all use cosine geometry.

Empty clusters are kept: cluster ids are always dense 0..k-1 and cluster_centroids has k rows,
some with size 0 (the select stage gives them no arm).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import scipy.sparse as sp
import sklearn
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn.cluster import MiniBatchKMeans
from threadpoolctl import threadpool_limits

from quadflow.log import Progress, get_logger
from quadflow.objectstore import ObjectStoreSettings
from quadflow.settings import ClusterSettings, RunSettings
from quadflow.shards import (Parts, Shard, ShardResult, data_part, drop_loaded_table, execute_shards,
                             forget_unusable_shards, input_preparer, keep_outputs, part_rows, plan_shards,
                             point_views, run_shards, shard_infos, stage_parts, worker_name)
from quadflow.store import StageRef, connect, insert_frame, make_ref, query_sql, run_sql, stage_key, transaction
from quadflow.tasking import SHARDED_CACHE_POLICY, stage_task, transient_failure

from quadflow.tasks.featurize import sample_rows

VERSION = f"cluster-4/sklearn-{sklearn.__version__}"
INERTIA_META = "quadflow.cluster.info"  # output part metadata: the shard's inertia (sum of squared distances)

MIN_K, MAX_K = 8, 10_000  # Quad (ICLR 2025) uses 10k clusters for ~600M documents: the upper end
N_NEAREST = 5  # auto gamma: median distance to the 5th-nearest other centroid, so ~half the arms share with >= 5
_BLOCK = 2048  # rows per block of pairwise centroid or document-centroid similarities
_SIM_FLOATS = 2**25  # at most 128 MiB of float32 document-centroid similarities at once (32k rows up to k 1024)
STREAM_ROWS = 200_000  # pool documents per read when the whole pool is the fit sample (~51 MiB of 64-dim vectors)
_READ_ROWS = 65_536  # rows per arrow record batch fetched from the store (~17 MiB of 64-dim vectors)
_MAX_SPLIT_ROUNDS = 4  # splits of splits: a cluster whose parts are still over the token cap is split again

PAIRS_SCHEMA = {"cluster": pl.Int32, "neighbor": pl.Int32, "distance": pl.Float32}


def auto_k(n_docs: int) -> int:
    """Clusters for a pool of n_docs: round(sqrt(n)), within [8, 10000], and never more than n.

    sqrt(n) gives as many clusters as documents per cluster, so both the number of arms and
    the blocks drawn from each grow with the pool (354k docs -> 595 clusters of ~600).
    """
    if n_docs < 1:
        raise ValueError(f"cannot cluster {n_docs!r} documents")
    return min(n_docs, max(MIN_K, min(MAX_K, round(math.sqrt(n_docs)))))


def _l2_normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float32, copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


class Clusterer:
    """MiniBatchKMeans on L2-normalized vectors, with cosine labels and normalized centroids.

    `fit(X)` fits in memory. For a pool too big for memory the same steps run one batch at a
    time, in doc order: `fit_sample(X_sample)` fits k-means on a sample, `partial_assign(X_batch)`
    over every batch sums each cluster's members (pass 1), `finalize()` turns the sums into
    centroids, and `partial_distances(X_batch)` over every batch gives the final labels and
    distances and sums the inertia (pass 2). `fit(X)` is exactly these steps with X as one batch.

    Token-balanced (`fit(X, tokens)` with max_token_multiple): clusters holding more than
    max_token_multiple / k of the tokens are split, so long manuals of different sources do not
    share one huge cluster (see fit_sample).

    After fit: k_ clusters (k, or more after splits); labels_ (n,) int32, the most cosine-similar
    k-means center; centroids_ (k_, dim) float32, the normalized mean of each cluster's members;
    distances_ (n,) float32 cosine distance to the own centroid; sizes_ (k_,) int64 (may hold
    zeros); inertia_ = sum of squared Euclidean distances to the own centroid. Documents with a
    zero vector (no n-grams) keep MiniBatchKMeans' label and get distance 1. The batch steps keep
    no per-document state: labels_ and distances_ exist after fit(X) only.
    """

    def __init__(self, k: int, batch_size: int = 4096, random_state: int | None = 0, n_init: int = 3,
                 max_iter: int = 100, max_token_multiple: float | None = None):
        self.k = k
        self.batch_size = batch_size
        self.random_state = random_state
        self.n_init = n_init
        self.max_iter = max_iter
        self.max_token_multiple = max_token_multiple

    def fit(self, X: np.ndarray, tokens: np.ndarray | None = None) -> "Clusterer":
        X = _as_matrix(X)
        self.fit_sample(X, tokens)
        labels = self.partial_assign(X)
        self.finalize()
        self.labels_, self.distances_ = self.partial_distances(X, labels)
        return self

    def fit_sample(self, X: np.ndarray, tokens: np.ndarray | None = None) -> "Clusterer":
        """Fit the k-means centers on (a sample of) the pool and reset the pass-1 sums.

        With max_token_multiple, `tokens` (each row's token count) is required, and any cluster
        holding more than max_token_multiple / k of the sample's tokens is split by a token-weighted
        k-means of its members into as many parts as it holds multiples of that share (repeated
        while a split still separates something). The k-means over documents is untouched, so
        clusters of short documents stay as they were; the split centers join them and k_ may end
        above k. Without max_token_multiple, `tokens` is not used.
        """
        X = _as_matrix(X)
        n = X.shape[0]
        if not 1 <= self.k <= n:
            raise ValueError(f"k must be in [1, n_docs={n}], got {self.k!r}")
        if self.max_token_multiple is not None:
            if tokens is None:
                raise ValueError("max_token_multiple splits clusters by their tokens: pass tokens to fit_sample()")
            weights = np.asarray(tokens, dtype=np.float64).ravel()
            if weights.shape != (n,) or not (np.isfinite(weights).all() and (weights >= 0).all()):
                raise ValueError(f"tokens must be {n} finite counts >= 0, one per row of X")
        km = self._kmeans(self.k, self.random_state, X, None)
        for name in ("centroids_", "labels_", "distances_"):
            self.__dict__.pop(name, None)
        self.kmeans_ = km
        raw = np.array(km.cluster_centers_, dtype=np.float32, copy=True)  # (k, dim); splits must not touch km's
        self.n_split_ = 0
        if self.max_token_multiple is not None:
            raw = self._split_heavy(X, np.maximum(weights, 1.0), raw)  # an empty document still counts
        self.raw_centers_ = raw  # (k_, dim) k-means centers, split ones included
        self.centers_ = _l2_normalize_rows(raw)  # (k_, dim) normalized k-means centers
        self.k_ = int(raw.shape[0])
        self.n_iter_ = int(km.n_iter_)
        self.member_sums_ = np.zeros((self.k_, X.shape[1]), dtype=np.float64)  # (k_, dim)
        self.sizes_ = np.zeros(self.k_, dtype=np.int64)
        self.inertia_ = 0.0
        return self

    def _kmeans(self, k: int, seed: int | None, X: np.ndarray, weights: np.ndarray | None) -> MiniBatchKMeans:
        """MiniBatchKMeans with k clusters fitted on X (rows weighted by `weights` if given)."""
        km = MiniBatchKMeans(n_clusters=k, batch_size=self.batch_size, n_init=self.n_init, max_iter=self.max_iter,
                             random_state=seed)
        # One thread: the per-step matrices are small, and on 2 busy cores BLAS/OpenMP hand-offs
        # cost 3-15x the CPU (measured on the Debian pool); it also makes the fit independent of
        # the machine's core count, so a seed gives the same clusters everywhere.
        with threadpool_limits(limits=1):
            return km.fit(X, sample_weight=weights)

    def _split_heavy(self, X: np.ndarray, weights: np.ndarray, raw: np.ndarray) -> np.ndarray:
        """Centers with every cluster over the token cap split; a split center keeps its index
        (the first part) and the others are appended, so k-means' own labels stay valid.

        The sample is labelled once; a split relabels only the split cluster's members among its
        parts (the final labels come from the passes, against every center).
        """
        cap = float(self.max_token_multiple) / self.k * weights.sum()
        rng = np.random.default_rng(self.random_state)
        labels, _ = assign(X, _l2_normalize_rows(raw))  # (n,)
        for _ in range(_MAX_SPLIT_ROUNDS):
            mass = np.bincount(labels, weights=weights, minlength=raw.shape[0])
            split_any = False
            for j in np.flatnonzero(mass > cap):
                members = np.flatnonzero(labels == j)
                parts = min(int(np.ceil(mass[j] / cap)), members.size)
                if parts < 2:
                    continue
                sub = self._kmeans(parts, int(rng.integers(2**31)), X[members], weights[members])
                centers = np.asarray(sub.cluster_centers_, dtype=np.float32)[np.unique(sub.labels_)]
                if centers.shape[0] < 2:  # identical directions: nothing to separate
                    continue
                part, _ = assign(X[members], _l2_normalize_rows(centers))
                ids = np.concatenate([[j], raw.shape[0] + np.arange(centers.shape[0] - 1)])
                labels[members] = ids[part]
                raw[j] = centers[0]
                raw = np.vstack([raw, centers[1:]])
                self.n_split_ += 1
                split_any = True
            if not split_any:
                break
        return raw

    def batch_sums(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pass 1's work on one batch, without touching the model: (labels (b,) int32, member sums (k_, dim)
        float64, sizes (k_,) int64). A shard task computes these; `add_sums` adds them up.

        The sums are float64 (exact to ~1e-16 of their size), so how the pool is cut into batches or
        shards does not show in the float32 centroids.
        """
        if not hasattr(self, "centers_"):
            raise RuntimeError("Clusterer has no k-means centers: call fit_sample() first")
        X = _as_matrix(X, self.centers_.shape[1])
        labels = self._kmeans_labels(X)
        b = X.shape[0]
        members = sp.csr_matrix((np.ones(b, np.float64), (labels, np.arange(b))), shape=(self.k_, b))
        sums = np.asarray(members @ X.astype(np.float64))  # (k_, dim), in doc order as one sparse product
        return labels, sums, np.bincount(labels, minlength=self.k_).astype(np.int64)

    def add_sums(self, sums: np.ndarray, sizes: np.ndarray) -> None:
        """Add one batch's `batch_sums` to pass 1's member sums and sizes."""
        if not hasattr(self, "member_sums_"):
            raise RuntimeError("Clusterer has no k-means centers: call fit_sample() first")
        if hasattr(self, "centroids_"):
            raise RuntimeError("Clusterer is finalized: call fit_sample() again before partial_assign()")
        if sums.shape != self.member_sums_.shape or sizes.shape != self.sizes_.shape:
            raise ValueError(f"sums of shape {sums.shape} and sizes {sizes.shape} for a model of {self.k_} clusters "
                             f"in {self.member_sums_.shape[1]} dims")
        self.member_sums_ += sums
        self.sizes_ += sizes

    def partial_assign(self, X: np.ndarray) -> np.ndarray:
        """Pass 1 over one batch: its labels (b,) int32, added to the member sums and sizes."""
        if hasattr(self, "centroids_"):
            raise RuntimeError("Clusterer is finalized: call fit_sample() again before partial_assign()")
        labels, sums, sizes = self.batch_sums(X)
        self.add_sums(sums, sizes)
        return labels

    def finalize(self) -> "Clusterer":
        """Centroids from the pass-1 sums: mean direction of the members."""
        if not hasattr(self, "member_sums_"):
            raise RuntimeError("Clusterer has no member sums: call fit_sample() and partial_assign() first")
        # Mini-batch centers lag behind on small pools, so the centroid is the members' mean
        # direction; an empty cluster keeps its k-means center.
        sums = self.member_sums_.astype(np.float32)  # (k_, dim)
        empty = ~np.any(sums, axis=1)
        sums[empty] = self.raw_centers_[empty]
        self.centroids_ = _l2_normalize_rows(sums)  # (k_, dim)
        self.inertia_ = 0.0
        return self

    def batch_distances(self, X: np.ndarray, labels: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray, float]:
        """Pass 2's work on one batch, without touching the model: (labels (b,) int32, distances (b,) float32,
        the batch's sum of squared Euclidean distances to the own centroid).

        labels: the batch's pass-1 labels when still at hand, else recomputed (the same).
        """
        if not hasattr(self, "centroids_"):
            raise RuntimeError("Clusterer is not finalized: call finalize() after the partial_assign() pass")
        X = _as_matrix(X, self.centroids_.shape[1])
        if labels is None:
            labels = self._kmeans_labels(X)
        elif len(labels) != X.shape[0]:
            raise ValueError(f"{len(labels)} labels for a batch of {X.shape[0]} rows")
        cos = np.einsum("ij,ij->i", X, self.centroids_[labels])  # (b,)
        distances = np.clip(1.0 - cos, 0.0, 2.0).astype(np.float32)
        # ||x - c||^2 = |x|^2 + |c|^2 - 2 x.c  (= 2 * cosine distance for unit x and c)
        sq_x = np.einsum("ij,ij->i", X, X, dtype=np.float64)
        sq_c = np.einsum("ij,ij->i", self.centroids_, self.centroids_, dtype=np.float64)[labels]
        return labels, distances, float(np.maximum(sq_x + sq_c - 2.0 * cos, 0.0).sum())

    def partial_distances(self, X: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pass 2 over one batch: (labels (b,) int32, distances (b,) float32); adds to inertia_."""
        labels, distances, sq = self.batch_distances(X, labels)
        self.inertia_ += sq
        return labels, distances

    def _kmeans_labels(self, X: np.ndarray) -> np.ndarray:
        """(b,) int32 most cosine-similar k-means center; zero rows: MiniBatchKMeans' own label."""
        labels, _ = assign(X, self.centers_)
        zero = ~np.any(X, axis=1)  # (b,) documents without a direction
        if zero.any():
            # km.predict is how km.labels_ was computed, so fitted rows keep their fit label
            with threadpool_limits(limits=1):
                labels[zero] = self.kmeans_.predict(X[zero])
        return labels

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Most cosine-similar centroid of each row (int32)."""
        if not hasattr(self, "centroids_"):
            raise RuntimeError("Clusterer is not fitted: call fit() first")
        return assign(np.ascontiguousarray(X, dtype=np.float32), self.centroids_)[0]


def _as_matrix(X: np.ndarray, dim: int | None = None) -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_docs, dim), got shape {X.shape!r}")
    if dim is not None and X.shape[1] != dim:
        raise ValueError(f"X has {X.shape[1]} columns, the fitted centers have {dim}")
    return X


def assign(X: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,) int32, cosine (n,) float32) of each row's most similar centroid, in blocks."""
    n = X.shape[0]
    labels = np.empty(n, dtype=np.int32)
    cos = np.empty(n, dtype=np.float32)
    rows = max(_BLOCK, min(16 * _BLOCK, _SIM_FLOATS // max(centroids.shape[0], 1)))
    for a in range(0, n, rows):
        sim = X[a : a + rows] @ centroids.T  # (block, k)
        best = np.argmax(sim, axis=1)
        labels[a : a + len(best)] = best
        cos[a : a + len(best)] = sim[np.arange(len(best)), best]
    return labels, cos


def _distance_blocks(c: np.ndarray):
    """Yield (start, D) with D (block, k) cosine distances, self-distances set to +inf."""
    k = c.shape[0]
    for a in range(0, k, _BLOCK):
        d = 1.0 - c[a : a + _BLOCK] @ c.T  # (block, k)
        rows = np.arange(d.shape[0])
        d[rows, a + rows] = np.inf
        yield a, d


def neighbor_graph(centroids: np.ndarray, gamma: float | None = None) -> tuple[pl.DataFrame, float]:
    """Centroid pairs closer than gamma (cosine distance), both directions, and the gamma used.

    gamma None: the median over clusters of the distance to the 5th-nearest other centroid
    (the nearest that exists when there are fewer than 6 clusters; 0.0 for a single one).
    Each pair is computed once (i < j) and mirrored, so the graph is exactly symmetric.
    Memory is O(block * k), so k = 10,000 is fine.
    """
    c = _l2_normalize_rows(np.atleast_2d(centroids))
    k = c.shape[0]
    if gamma is not None and not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    if gamma is None:
        if k < 2:
            gamma = 0.0
        else:
            m = min(N_NEAREST, k - 1)
            kth = np.concatenate([np.partition(d, m - 1, axis=1)[:, m - 1] for _, d in _distance_blocks(c)])
            gamma = float(np.median(kth))
    src, dst, dist = [], [], []
    for a, d in _distance_blocks(c):
        i, j = np.nonzero(d < gamma)
        i = i + a
        upper = j > i
        src.append(i[upper])
        dst.append(j[upper])
        dist.append(d[i[upper] - a, j[upper]])
    if src:
        i, j, d = np.concatenate(src), np.concatenate(dst), np.concatenate(dist)
    else:
        i = j = np.zeros(0, np.int64)
        d = np.zeros(0, np.float32)
    pairs = pl.DataFrame(
        {
            "cluster": np.concatenate([i, j]).astype(np.int32),
            "neighbor": np.concatenate([j, i]).astype(np.int32),
            "distance": np.clip(np.concatenate([d, d]), 0.0, 2.0).astype(np.float32),
        },
        schema=PAIRS_SCHEMA,
    ).sort("cluster", "neighbor")
    return pairs, float(gamma)


# ---------------------------------------------------------------------------------------------
# Store helpers and task
# ---------------------------------------------------------------------------------------------


def _pool_shape(con: Any, key: str) -> tuple[int, int]:
    """(n, dim) of a featurize partition's pool vectors, checked dense in doc_idx 0..n-1."""
    n, first, last, dim = query_sql(con, "cluster_vectors_shape", {"key": key}).fetchone()
    if n == 0:
        raise ValueError(f"featurize partition {key!r} has no pool vectors to cluster")
    if first != 0 or last != n - 1:
        raise ValueError(f"featurize_vectors {key}/pool: doc_idx is not dense 0..{n - 1} (runs {first}..{last})")
    return int(n), int(dim)


def _fill(reader: Any, out: np.ndarray, positions: Any, what: str) -> np.ndarray:
    """Place each (doc_idx, vec) row of a streamed query result (or a part's record batches) at
    out[positions(doc_idx)], exactly once.

    Rows may come in any order, so the query needs no sort, and only one arrow record batch
    is held at a time: memory is `out` plus _READ_ROWS vectors.
    """
    n, dim = out.shape
    seen = np.zeros(n, dtype=bool)  # (n,)
    read = 0
    for batch in reader:
        pos = positions(batch.column(0).to_numpy())  # (b,) rows of `out`
        col = batch.column(1)
        if pa.types.is_fixed_size_list(col.type):  # a part written by featurize's shard tasks
            if col.type.list_size != dim:
                raise ValueError(f"{what}: vectors have {col.type.list_size} dims, expected {dim}")
        else:
            lengths = np.diff(np.asarray(col.offsets))  # (b,)
            if len(lengths) and not (lengths == dim).all():
                raise ValueError(f"{what}: vectors have {lengths.min()} to {lengths.max()} dims, expected {dim}")
        out[pos] = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        seen[pos] = True
        read += len(pos)
    if read != n or not seen.all():  # n rows read and every row of `out` hit: no gaps, no duplicates
        raise ValueError(f"{what}: expected {n} vectors, one per doc_idx, read {read}")
    return out


def read_range(con: Any, key: str, lo: int, hi: int, dim: int) -> np.ndarray:
    """(hi - lo, dim) float32 pool vectors of doc_idx lo..hi-1, row i = doc_idx lo + i."""
    what = f"featurize_vectors {key}/pool [{lo}, {hi})"

    def positions(doc_idx: np.ndarray) -> np.ndarray:
        return doc_idx - lo  # the query keeps lo <= doc_idx < hi

    reader = query_sql(con, "cluster_vectors_range", {"key": key, "lo": lo, "hi": hi}).fetch_record_batch(_READ_ROWS)
    return _fill(reader, np.empty((hi - lo, dim), dtype=np.float32), positions, what)


@contextmanager
def _picked(con: Any, rows: np.ndarray) -> Iterator[None]:
    """The doc_idx `rows` registered as the arrow table `picked` the sample queries join on."""
    con.register("picked", pa.table({"doc_idx": pa.array(rows)}))
    try:
        yield
    finally:
        con.unregister("picked")


def read_rows(con: Any, key: str, rows: np.ndarray, dim: int) -> np.ndarray:
    """(len(rows), dim) float32 pool vectors of the sorted, distinct doc_idx `rows`, in that order."""
    rows = np.asarray(rows, dtype=np.int64)

    def positions(doc_idx: np.ndarray) -> np.ndarray:
        return np.searchsorted(rows, doc_idx)  # the query keeps doc_idx in rows

    with _picked(con, rows):
        reader = query_sql(con, "cluster_vectors_rows", {"key": key}).fetch_record_batch(_READ_ROWS)
        out = np.empty((len(rows), dim), dtype=np.float32)
        return _fill(reader, out, positions, f"featurize_vectors {key}/pool sample")


def read_tokens(con: Any, docs_key: str, rows: np.ndarray) -> np.ndarray:
    """(len(rows),) token counts of the sorted, distinct pool doc_idx `rows` of an ingest partition."""
    rows = np.asarray(rows, dtype=np.int64)
    with _picked(con, rows):
        table = query_sql(con, "cluster_sample_tokens", {"key": docs_key}).fetch_arrow_table()
    out = np.zeros(len(rows), dtype=np.int64)
    got = table.column("doc_idx").to_numpy()
    if len(got) != len(rows):
        raise ValueError(f"ingest_docs {docs_key}/pool: {len(got)} of the {len(rows)} sampled documents found; "
                         "the docs and features refs are of different partitions")
    out[np.searchsorted(rows, got)] = table.column("n_tokens").to_numpy()
    return out


def _ranges(n: int):
    for lo in range(0, n, STREAM_ROWS):
        yield lo, min(lo + STREAM_ROWS, n)


def load_assignments(con: Any, key: str) -> np.ndarray:
    """Cluster label (int32) of every pool document of a cluster partition, row i = doc_idx i."""
    table = query_sql(con, "cluster_assignments_load", {"key": key}).fetch_arrow_table()
    doc_idx = table.column("doc_idx").to_numpy()
    if len(doc_idx) and (doc_idx[0] != 0 or doc_idx[-1] != len(doc_idx) - 1):
        raise ValueError(f"cluster_assignments {key}: doc_idx is not dense (last is {doc_idx[-1]})")
    return table.column("cluster").to_numpy().astype(np.int32, copy=False)


def load_neighbors(con: Any, key: str) -> pl.DataFrame:
    """Neighbour pairs (cluster, neighbor, distance) of a cluster partition, both directions."""
    pairs = pl.from_arrow(query_sql(con, "cluster_neighbors_load", {"key": key}).fetch_arrow_table())
    return pairs.cast(PAIRS_SCHEMA)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Shard tasks: the two passes over the pool, on the flow's task runner
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSums:
    """Pass 1 of one shard: its documents' member sums (k_, dim) float64 and sizes (k_,) per cluster."""

    shard: Shard
    sums: np.ndarray
    sizes: np.ndarray


def _shard_vectors(parts: Parts, url: str, shard: Shard, dim: int) -> np.ndarray:
    """(shard.docs, dim) float32 vectors of a shard's input part, row i = doc_idx shard.lo + i."""
    def positions(doc_idx: np.ndarray) -> np.ndarray:
        if len(doc_idx) and (doc_idx.min() < shard.lo or doc_idx.max() >= shard.hi):
            raise ValueError(f"input part {url} holds doc_idx outside {shard.lo}..{shard.hi - 1}")
        return doc_idx - shard.lo

    table = parts.read_table(url, columns=["doc_idx", "vec"])
    return _fill(table.to_batches(_READ_ROWS), np.empty((shard.docs, dim), dtype=np.float32), positions,
                 f"input part {url}")


def _load_model(parts: Parts, url: str) -> Clusterer:
    model = parts.load_pickle(url)
    if not isinstance(model, Clusterer):
        raise TypeError(f"{url} does not hold a fitted Clusterer")
    return model


@task(name="cluster-sums-shard", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient_failure)
def cluster_sums_shard(shard: Shard, input_path: str, output_path: str, model_path: str, parts: Parts
                       ) -> ShardSums:
    """Pass 1 of one shard: label its vectors by the k-means centers and sum them per cluster (no part written:
    the sums are small, and the flow adds them up in shard order)."""
    model = _load_model(parts, model_path)
    _, sums, sizes = model.batch_sums(_shard_vectors(parts, input_path, shard, model.centers_.shape[1]))
    return ShardSums(shard, sums, sizes)


@task(name="cluster-shard", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient_failure)
def cluster_shard(shard: Shard, input_path: str, output_path: str, model_path: str, parts: Parts) -> ShardResult:
    """Pass 2 of one shard: its output part (doc_idx, cluster, distance), with the shard's share of the
    inertia in the part's metadata."""
    start = time.perf_counter()
    model = _load_model(parts, model_path)
    labels, distances, sq = model.batch_distances(_shard_vectors(parts, input_path, shard,
                                                                 model.centroids_.shape[1]))
    out = _assignments(shard.lo, labels, distances)
    out = out.replace_schema_metadata({INERTIA_META: json.dumps({"inertia": sq})})
    rows = parts.write_parquet(output_path, [out])
    return ShardResult(shard, output_path, rows, time.perf_counter() - start, worker_name())


def _export_vectors(con: Any, store_path: str, features_key: str, parts: Parts) -> Callable[[Shard, str], None]:
    """Input of a cluster shard: featurize's kept part of the same documents when featurize cut the pool the same
    way (linked, or uploaded to an s3:// prefix), else the shard's rows read from featurize_vectors."""
    def export(shard: Shard, url: str) -> None:
        kept = data_part(store_path, "featurize", features_key, shard)
        if part_rows(kept) == shard.docs:
            parts.put(url, kept, columns=["doc_idx", "vec"])
            return
        reader = query_sql(con, "cluster_vectors_range", {"key": features_key, "lo": shard.lo, "hi": shard.hi}
                           ).fetch_record_batch(_READ_ROWS)
        parts.write_parquet(url, reader, schema=reader.schema)
    return export


def _pass_one(model: Clusterer, shards: list[Shard], parts: Parts, export: Callable[[Shard, str], None],
              model_url: str) -> None:
    """Pass 1 on the task runner: every shard's member sums, added in shard order (a shard that finishes early
    waits for those before it), so the centroids do not depend on which worker was fastest."""
    progress = Progress("cluster sums", sum(s.docs for s in shards))
    waiting: dict[int, ShardSums] = {}
    order = {s.lo: i for i, s in enumerate(shards)}
    added = 0
    for result in execute_shards(cluster_sums_shard, shards, parts, {"model_path": model_url},
                                 input_preparer(parts, export)):
        waiting[order[result.shard.lo]] = result
        while added in waiting:
            done = waiting.pop(added)
            model.add_sums(done.sums, done.sizes)
            progress.update(done.shard.docs)
            added += 1
    progress.close()
    if added != len(shards):
        raise RuntimeError(f"cluster pass 1: {added} of {len(shards)} shards summed")


def _fitted(con: Any, settings: ClusterSettings, features: StageRef, docs: StageRef | None, seed: int, n: int,
            dim: int, shards: list[Shard], parts: Parts, export: Callable[[Shard, str], None]) -> Clusterer:
    """The finalized model of this partition: loaded when an earlier (killed) run saved it, else k-means fitted
    here on the seeded sample, pass 1 on the task runner, centroids from its sums; saved for pass 2."""
    log = get_logger()
    model_url = parts.url("model.pkl")
    if parts.exists(model_url):
        model = _load_model(parts, model_url)
        log.info(f"cluster: reusing the model fitted by an earlier run ({model_url})")
        return model
    rows = sample_rows(n, settings.fit_sample, seed)  # (s,) sorted doc_idx the k-means fit sees
    k = auto_k(n) if settings.k is None else settings.k
    if k > len(rows):
        where = f"the pool's {n} documents" if len(rows) == n else f"the fit sample's {len(rows)} documents"
        log.warning(f"cluster: k = {k} exceeds {where}; using k = {len(rows)}")
        k = len(rows)
    balanced = settings.balance == "tokens"
    tokens = read_tokens(con, docs.key, rows) if balanced else None
    model = Clusterer(k, settings.batch_size, seed,
                      max_token_multiple=settings.max_token_multiple if balanced else None)
    if len(rows) == n:
        sample = np.empty((n, dim), dtype=np.float32)  # (n, dim): the whole pool
        for lo, hi in _ranges(n):
            sample[lo:hi] = read_range(con, features.key, lo, hi, dim)
    else:
        sample = read_rows(con, features.key, rows, dim)
    model.fit_sample(sample, tokens)
    del sample
    centers_url = parts.url("centers.pkl")
    parts.save_pickle(centers_url, model)
    _pass_one(model, shards, parts, export, centers_url)
    model.finalize()
    parts.save_pickle(model_url, model)
    parts.delete(centers_url)
    split = f" ({model.n_split_} split from k {k} by tokens)" if model.n_split_ else ""
    log.info(f"cluster: k {model.k_}{split} fitted on {len(rows):,} of {n:,} docs, "
             f"{int((model.sizes_ == 0).sum())} empty, {model.n_iter_} epochs")
    return model


def _assignments(lo: int, labels: np.ndarray, distances: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "doc_idx": pa.array(np.arange(lo, lo + len(labels), dtype=np.int64)),
            "cluster": pa.array(labels),
            "distance": pa.array(distances),
        }
    )


@stage_task("cluster", cache_policy=SHARDED_CACHE_POLICY)
def cluster(settings: ClusterSettings, features: StageRef, seed: int, docs: StageRef | None = None,
            run: RunSettings = RunSettings(), objectstore: ObjectStoreSettings | None = None) -> StageRef:
    """Cluster the pool's vectors and write assignments, centroids, the neighbour graph and info.

    k-means is fitted here on a seeded sample (memory bounded by fit_sample, not by the pool); the two
    passes over every document run as shard tasks on the flow's task runner (quadflow.shards): pass 1
    sums each cluster's members (the centroids), pass 2 writes each shard's assignments as a part kept
    in `<store>.data/cluster/`, which the view cluster_assignments reads in place. With balance =
    tokens, clusters over the token cap are split on the sample, whose token counts are read from
    `docs` (the ingest partition `features` was made from).
    """
    key = stage_key("cluster", VERSION, settings, features, seed)  # features' key holds docs' key
    log = get_logger()
    if settings.balance == "tokens" and docs is None:
        raise ValueError("cluster.balance = 'tokens' weighs documents by their tokens: pass the docs ref the "
                         "features were made from, or set cluster.balance = 'docs'")
    store_path = features.store.path
    with connect(features.store) as con:
        drop_loaded_table(con, "cluster", "cluster_assignments")
        run_sql(con, "cluster_create")
        n, dim = _pool_shape(con, features.key)
        parts = stage_parts(run, store_path, "cluster", key, objectstore)
        parts.check()
        shards = plan_shards({"pool": n}, run.shard_docs)
        forget_unusable_shards(con, "cluster", key, shards, store_path)
        export = _export_vectors(con, store_path, features.key, parts)
        model = _fitted(con, settings, features, docs, seed, n, dim, shards, parts, export)
        k = model.k_
        pairs, gamma = neighbor_graph(model.centroids_, settings.gamma)
        log.info(f"cluster: gamma {gamma:.4f}{' (auto)' if settings.gamma is None else ''}, "
                 f"{len(pairs) / max(k, 1):.1f} neighbours per cluster")
        load = keep_outputs("cluster", key, parts, store_path, info_meta=INERTIA_META)  # the ledger: its inertia
        progress = Progress("cluster assign", n)
        stats = run_shards(con, "cluster", key, shards, parts, export, cluster_shard,
                           {"model_path": parts.url("model.pkl")}, load, progress)
        progress.close()
        log.info(f"cluster: {stats.summary()}")
        inertia = math.fsum(json.loads(text)["inertia"] for text in shard_infos(con, "cluster", key))
        centroids = pa.table(
            {
                "cluster": pa.array(np.arange(k, dtype=np.int32)),
                "size": pa.array(model.sizes_),
                "vec": pa.FixedSizeListArray.from_arrays(pa.array(model.centroids_.reshape(-1)), dim),
            }
        )
        with transaction(con):
            point_views(con, "cluster", "cluster_views", store_path)
            written = np.zeros(k, dtype=np.int64)  # (k,) members written, checked against pass 1's sizes
            for c, count in query_sql(con, "cluster_sizes", {"key": key}).fetchall():
                written[c] = count
            if not np.array_equal(written, model.sizes_):
                bad = int(np.flatnonzero(written != model.sizes_)[0])
                raise RuntimeError(f"cluster {bad}: {written[bad]} members written but {model.sizes_[bad]} "
                                   "summed into its centroid; the two passes disagree")
            run_sql(con, "cluster_delete", {"key": key})
            insert_frame(con, "cluster_centroids_insert", centroids, {"key": key})
            insert_frame(con, "cluster_neighbors_insert", pairs, {"key": key})
            run_sql(con, "cluster_info_insert", {"key": key, "k": k, "gamma": gamma, "inertia": inertia})
        ref = make_ref(con, "cluster", key, features.store, "cluster_assignments", ["doc_idx", "cluster"])
    parts.clean()
    return ref
