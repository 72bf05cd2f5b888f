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

import math
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import scipy.sparse as sp
import sklearn
from sklearn.cluster import MiniBatchKMeans
from threadpoolctl import threadpool_limits

from quadflow.log import get_logger
from quadflow.settings import ClusterSettings
from quadflow.store import StageRef, connect, insert_frame, make_ref, query_sql, run_sql, stage_key, transaction
from quadflow.tasking import stage_task

from tasks.featurize import load_vectors

VERSION = f"cluster-1/sklearn-{sklearn.__version__}"

MIN_K, MAX_K = 8, 10_000  # Quad (ICLR 2025) uses 10k clusters for ~600M documents: the upper end
N_NEAREST = 5  # auto gamma: median distance to the 5th-nearest other centroid, so ~half the arms share with >= 5
_BLOCK = 2048  # rows per block of pairwise centroid or document-centroid similarities

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

    After fit: labels_ (n,) int32, the most cosine-similar k-means center; centroids_ (k, dim)
    float32, the normalized mean of each cluster's members; distances_ (n,) float32 cosine
    distance to the own centroid; sizes_ (k,) int64 (may hold zeros); inertia_ = sum of
    squared Euclidean distances to the own centroid. Documents with a zero vector (no n-grams)
    keep MiniBatchKMeans' label and get distance 1.
    """

    def __init__(self, k: int, batch_size: int = 4096, random_state: int | None = 0, n_init: int = 3,
                 max_iter: int = 100):
        self.k = k
        self.batch_size = batch_size
        self.random_state = random_state
        self.n_init = n_init
        self.max_iter = max_iter

    def fit(self, X: np.ndarray) -> "Clusterer":
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (n_docs, dim), got shape {X.shape!r}")
        n = X.shape[0]
        if not 1 <= self.k <= n:
            raise ValueError(f"k must be in [1, n_docs={n}], got {self.k!r}")
        km = MiniBatchKMeans(
            n_clusters=self.k,
            batch_size=self.batch_size,
            n_init=self.n_init,
            max_iter=self.max_iter,
            random_state=self.random_state,
        )
        # One thread: the per-step matrices are small, and on 2 busy cores BLAS/OpenMP hand-offs
        # cost 3-15x the CPU (measured on the Debian pool); it also makes the fit independent of
        # the machine's core count, so a seed gives the same clusters everywhere.
        with threadpool_limits(limits=1):
            km.fit(X)
        labels, _ = assign(X, _l2_normalize_rows(km.cluster_centers_))
        zero = ~np.any(X, axis=1)  # (n,) documents without a direction
        labels[zero] = km.labels_[zero]
        # Centroid = mean direction of the members (mini-batch centers lag behind on small pools);
        # an empty cluster keeps its k-means center.
        members = sp.csr_matrix((np.ones(n, np.float32), (labels, np.arange(n))), shape=(self.k, n))
        sums = np.asarray(members @ X)  # (k, dim)
        empty = ~np.any(sums, axis=1)
        sums[empty] = km.cluster_centers_[empty]
        self.centroids_ = _l2_normalize_rows(sums)  # (k, dim)
        cos = np.einsum("ij,ij->i", X, self.centroids_[labels])  # (n,)
        self.labels_ = labels
        self.distances_ = np.clip(1.0 - cos, 0.0, 2.0).astype(np.float32)
        self.sizes_ = np.bincount(labels, minlength=self.k).astype(np.int64)
        # ||x - c||^2 = |x|^2 + |c|^2 - 2 x.c  (= 2 * cosine distance for unit x and c)
        sq_x = np.einsum("ij,ij->i", X, X, dtype=np.float64)
        sq_c = np.einsum("ij,ij->i", self.centroids_, self.centroids_, dtype=np.float64)[labels]
        self.inertia_ = float(np.maximum(sq_x + sq_c - 2.0 * cos, 0.0).sum())
        self.n_iter_ = int(km.n_iter_)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Most cosine-similar centroid of each row (int32)."""
        if not hasattr(self, "centroids_"):
            raise RuntimeError("Clusterer is not fitted: call fit() first")
        return assign(np.ascontiguousarray(X, dtype=np.float32), self.centroids_)[0]


def assign(X: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,) int32, cosine (n,) float32) of each row's most similar centroid, in blocks."""
    n = X.shape[0]
    labels = np.empty(n, dtype=np.int32)
    cos = np.empty(n, dtype=np.float32)
    for a in range(0, n, 16 * _BLOCK):
        sim = X[a : a + 16 * _BLOCK] @ centroids.T  # (block, k)
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


@stage_task("cluster")
def cluster(settings: ClusterSettings, features: StageRef, seed: int) -> StageRef:
    """Cluster the pool's vectors and write assignments, centroids, the neighbour graph and info."""
    key = stage_key("cluster", VERSION, settings, features, seed)
    log = get_logger()
    with connect(features.store) as con:
        run_sql(con, "cluster_create")
        X = load_vectors(con, features.key, "pool")  # (n, dim) float32
        n = X.shape[0]
        if n == 0:
            raise ValueError(f"featurize partition {features.key!r} has no pool vectors to cluster")
        k = auto_k(n) if settings.k is None else settings.k
        if k > n:
            log.warning(f"cluster: k = {k} exceeds the pool's {n} documents; using k = {n}")
            k = n
        model = Clusterer(k, settings.batch_size, seed).fit(X)
        pairs, gamma = neighbor_graph(model.centroids_, settings.gamma)
        log.info(
            f"cluster: k {k}, {int((model.sizes_ == 0).sum())} empty, {model.n_iter_} epochs, "
            f"gamma {gamma:.4f}{' (auto)' if settings.gamma is None else ''}, "
            f"{len(pairs) / max(k, 1):.1f} neighbours per cluster"
        )
        assignments = pa.table(
            {
                "doc_idx": pa.array(np.arange(n, dtype=np.int64)),
                "cluster": pa.array(model.labels_),
                "distance": pa.array(model.distances_),
            }
        )
        centroids = pa.table(
            {
                "cluster": pa.array(np.arange(k, dtype=np.int32)),
                "size": pa.array(model.sizes_),
                "vec": pa.FixedSizeListArray.from_arrays(pa.array(model.centroids_.reshape(-1)), X.shape[1]),
            }
        )
        with transaction(con):
            run_sql(con, "cluster_delete", {"key": key})
            insert_frame(con, "cluster_assignments_insert", assignments, {"key": key})
            insert_frame(con, "cluster_centroids_insert", centroids, {"key": key})
            insert_frame(con, "cluster_neighbors_insert", pairs, {"key": key})
            run_sql(con, "cluster_info_insert", {"key": key, "k": k, "gamma": gamma, "inertia": model.inertia_})
        return make_ref(con, "cluster", key, features.store, "cluster_assignments", ["doc_idx", "cluster"])
