"""Cluster: k sizing, the clusterer, the centroid-neighbour graph, the task's tables and loaders."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings as hsettings, strategies as st

import tasks.cluster as cluster_mod
from quadflow.settings import ClusterSettings
from quadflow.store import StageRef, connect, open_store, run_sql
from tasks.cluster import Clusterer, auto_k, cluster, load_assignments, load_neighbors, neighbor_graph
from tasks.featurize import vectors_batch


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def blobs(n_per=30, dim=8, groups=3, noise=0.05, seed=0):
    """`groups` tight bundles of unit vectors around orthogonal axes."""
    rng = np.random.default_rng(seed)
    x, y = [], []
    for g in range(groups):
        center = np.zeros(dim)
        center[g] = 1.0
        x.append(center + noise * rng.standard_normal((n_per, dim)))
        y += [g] * n_per
    return unit(np.vstack(x)), np.array(y)


# --- auto_k -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, k", [(1, 1), (5, 5), (8, 8), (63, 8), (100, 10), (354_213, 595), (10**9, 10_000)]
)
def test_auto_k_is_sqrt_n_clamped(n, k):
    assert auto_k(n) == k


def test_auto_k_rejects_an_empty_pool():
    with pytest.raises(ValueError, match="0"):
        auto_k(0)


# --- Clusterer ----------------------------------------------------------------------------


def same_partition(a, b):
    """Labels a and b group the items identically (up to renaming clusters)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_clusterer_separates_obvious_groups():
    x, y = blobs()
    model = Clusterer(3, batch_size=64, random_state=0).fit(x)
    assert same_partition(model.labels_, y)
    assert model.labels_.dtype == np.int32 and model.sizes_.tolist() == sorted(model.sizes_.tolist()) == [30] * 3
    assert np.allclose(np.linalg.norm(model.centroids_, axis=1), 1.0, atol=1e-5)
    cos = np.einsum("ij,ij->i", x, model.centroids_[model.labels_])
    assert np.allclose(model.distances_, 1 - cos, atol=1e-5)
    assert (model.distances_ >= 0).all() and (model.distances_ < 0.1).all()
    assert model.inertia_ == pytest.approx(2 * model.distances_.sum(), rel=1e-4)  # unit vectors


def test_clusterer_is_deterministic_under_a_seed():
    x, _ = blobs(groups=5, noise=0.3, seed=1)
    a = Clusterer(7, batch_size=64, random_state=11).fit(x)
    b = Clusterer(7, batch_size=64, random_state=11).fit(x)
    assert np.array_equal(a.labels_, b.labels_)
    assert np.array_equal(a.centroids_, b.centroids_)
    assert a.inertia_ == b.inertia_


def test_empty_clusters_are_kept_with_size_zero():
    x = unit(np.repeat(np.eye(4, dtype=np.float32)[:2], 10, axis=0))  # only 2 distinct points
    model = Clusterer(5, batch_size=64, random_state=0).fit(x)
    assert model.centroids_.shape == (5, 4) and model.sizes_.shape == (5,)
    assert model.sizes_.sum() == 20 and (model.sizes_ == 0).any()
    assert model.labels_.max() < 5


def test_zero_vectors_do_not_break_the_fit():
    x, _ = blobs(n_per=10)
    x = np.vstack([x, np.zeros((3, x.shape[1]), np.float32)])
    model = Clusterer(3, batch_size=64, random_state=0).fit(x)
    assert np.isfinite(model.distances_).all() and (model.distances_[-3:] == 1.0).all()


def test_clusterer_rejects_more_clusters_than_documents():
    with pytest.raises(ValueError, match="12"):
        Clusterer(12, random_state=0).fit(np.eye(4, dtype=np.float32))


# --- neighbor_graph -----------------------------------------------------------------------


def brute_distances(c):
    c = unit(c)
    d = 1.0 - c @ c.T
    np.fill_diagonal(d, np.inf)
    return d


@hsettings(max_examples=25, deadline=None)
@given(k=st.integers(2, 40), seed=st.integers(0, 10_000), block=st.sampled_from([3, 7, 2048]))
def test_neighbor_graph_is_symmetric_complete_and_uses_auto_gamma(k, seed, block):
    c = np.random.default_rng(seed).standard_normal((k, 6)).astype(np.float32)
    old = cluster_mod._BLOCK
    cluster_mod._BLOCK = block  # exercise the blocked computation
    try:
        pairs, gamma = neighbor_graph(c)
    finally:
        cluster_mod._BLOCK = old
    d = brute_distances(c)
    expected_gamma = np.median(np.sort(d, axis=1)[:, min(5, k - 1) - 1])
    assert gamma == pytest.approx(expected_gamma, abs=1e-5)
    got = set(zip(pairs["cluster"].to_list(), pairs["neighbor"].to_list()))
    assert got == {(j, i) for i, j in got}  # both directions
    assert all(i != j for i, j in got)
    assert (pairs["distance"].to_numpy() < gamma).all()
    sure = {(i, j) for i, j in zip(*np.nonzero(d < gamma - 1e-5))}  # clear of rounding at the edge
    assert sure <= got


def test_neighbor_graph_with_a_given_gamma():
    c = np.array([[1, 0], [0.99, 0.1], [0, 1], [-1, 0]], dtype=np.float32)
    pairs, gamma = neighbor_graph(c, gamma=0.2)
    assert gamma == 0.2
    assert pairs.select("cluster", "neighbor").rows() == [(0, 1), (1, 0)]
    assert pairs["distance"].dtype == pl.Float32
    assert pairs["distance"][0] == pytest.approx(1 - 0.99 / np.hypot(0.99, 0.1), abs=1e-6)
    with pytest.raises(ValueError, match="-1"):
        neighbor_graph(c, gamma=-1)


def test_neighbor_graph_with_few_clusters():
    pairs, gamma = neighbor_graph(np.array([[1.0, 0.0]], np.float32))
    assert gamma == 0.0 and pairs.is_empty()
    three = np.array([[1, 0], [0, 1], [0.8, 0.6]], dtype=np.float32)
    _, gamma = neighbor_graph(three)  # fewer than 5 others: the 2nd nearest is used
    assert gamma == pytest.approx(np.median(np.sort(brute_distances(three), axis=1)[:, 1]), abs=1e-6)


# --- task ---------------------------------------------------------------------------------


def make_features(tmp_path, x, key="features-key"):
    store = open_store(tmp_path / "store.duckdb")
    with connect(store) as con:
        run_sql(con, "featurize_create")
        con.register("batch", vectors_batch(np.arange(len(x)), x))
        run_sql(con, "featurize_vectors_insert", {"key": key, "role": "pool"})
        con.unregister("batch")
    return StageRef("featurize", key, store, len(x), "fp")


def test_task_writes_tables_that_round_trip(tmp_path):
    x, y = blobs(n_per=40, groups=4)
    features = make_features(tmp_path, x)
    settings = ClusterSettings(k=4, batch_size=64)
    ref = cluster.fn(settings, features, 0)
    assert ref.stage == "cluster" and ref.rows == len(x)
    model = Clusterer(4, 64, 0).fit(x)
    with connect(features.store, read_only=True) as con:
        labels = load_assignments(con, ref.key)
        assert labels.dtype == np.int32 and np.array_equal(labels, model.labels_)
        assert same_partition(labels, y)
        expected_pairs, gamma = neighbor_graph(model.centroids_)
        assert load_neighbors(con, ref.key).equals(expected_pairs)
        k, g, inertia = con.execute("select k, gamma, inertia from cluster_info where key = ?", [ref.key]).fetchone()
        assert (k, g) == (4, pytest.approx(gamma)) and inertia == pytest.approx(model.inertia_, rel=1e-5)
        sizes = con.execute(
            "select cluster, size from cluster_centroids where key = ? order by cluster", [ref.key]
        ).fetchall()
        assert sizes == list(enumerate(model.sizes_.tolist()))
        vec = con.execute("select vec from cluster_centroids where key = ? and cluster = 2", [ref.key]).fetchone()[0]
        assert np.allclose(vec, model.centroids_[2])
        dist = con.execute(
            "select distance from cluster_assignments where key = ? order by doc_idx", [ref.key]
        ).fetchnumpy()["distance"]
        assert np.allclose(dist, model.distances_)


def test_task_rerun_is_idempotent_and_auto_k_clamps_to_the_pool(tmp_path):
    x, _ = blobs(n_per=2, groups=3)  # 6 documents: auto k would be 8
    features = make_features(tmp_path, x)
    first = cluster.fn(ClusterSettings(batch_size=64), features, 0)
    again = cluster.fn(ClusterSettings(batch_size=64), features, 0)
    assert again == first
    with connect(features.store, read_only=True) as con:
        assert con.execute("select count(*) from cluster_assignments").fetchone()[0] == 6
        assert con.execute("select k from cluster_info where key = ?", [first.key]).fetchone()[0] == 6
        assert con.execute("select count(*) from cluster_centroids").fetchone()[0] == 6
        assert con.execute("select count(*) from cluster_info").fetchone()[0] == 1
