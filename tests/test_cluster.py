"""Cluster: k sizing, the clusterer, the centroid-neighbour graph, the task's tables and loaders."""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from hypothesis import given, settings as hsettings, strategies as st
from pydantic import ValidationError
from sklearn.cluster import MiniBatchKMeans
from threadpoolctl import threadpool_limits

import quadflow.tasks.cluster as cluster_mod
from quadflow.settings import ClusterSettings, RunSettings
from quadflow.store import StageRef, connect, open_store, run_sql
from quadflow.tasks.cluster import Clusterer, assign, auto_k, cluster, load_assignments, load_neighbors, neighbor_graph
from quadflow.tasks.featurize import sample_rows, vectors_batch


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


def heavy_pool(seed=0):
    """Four tight groups of 60 documents; group 0 holds long documents (1,000 tokens each), the rest 10."""
    x, y = blobs(n_per=60, dim=8, groups=4, noise=0.1, seed=seed)
    tokens = np.where(y == 0, 1000, 10)
    return x, y, tokens


def test_token_balance_splits_a_cluster_holding_too_many_tokens():
    """With tokens, a cluster over max_token_multiple / k of the tokens is split until none is (when
    its documents differ at all); the clusters of the light groups are left as they were."""
    x, y, tokens = heavy_pool()
    plain = Clusterer(4, batch_size=64, random_state=0).fit(x)
    assert plain.k_ == 4 and same_partition(plain.labels_, y)  # group 0 holds 97% of the tokens in one cluster
    model = Clusterer(4, batch_size=64, random_state=0, max_token_multiple=2.0).fit(x, tokens)
    cap = 2.0 / 4 * tokens.sum()
    mass = np.bincount(model.labels_, weights=tokens, minlength=model.k_)
    assert model.k_ > 4 and model.n_split_ >= 1 and mass.max() <= cap
    assert model.centroids_.shape == (model.k_, 8) and model.sizes_.sum() == len(x)
    assert np.unique(model.labels_[y == 0]).size >= 2  # the heavy group is spread over several clusters
    for g in (1, 2, 3):  # and no cluster mixes groups
        assert np.unique(model.labels_[y == g]).size == 1
        assert set(model.labels_[y == g]).isdisjoint(model.labels_[y != g])
    again = Clusterer(4, batch_size=64, random_state=0, max_token_multiple=2.0).fit(x, tokens)
    assert np.array_equal(again.labels_, model.labels_)  # seeded: the same splits
    # k-means itself is left as fitted: documents without a direction keep its label
    assert np.array_equal(model.kmeans_.cluster_centers_, plain.kmeans_.cluster_centers_)


def test_token_balance_leaves_a_cluster_of_identical_documents_whole():
    x, y, tokens = heavy_pool()
    x[y == 0] = x[0]  # the heavy group's documents all point the same way: nothing to split by
    model = Clusterer(4, batch_size=64, random_state=0, max_token_multiple=2.0).fit(x, tokens)
    assert model.k_ == 4 and model.n_split_ == 0 and same_partition(model.labels_, y)


def test_token_balance_needs_token_counts():
    x, _, tokens = heavy_pool()
    with pytest.raises(ValueError, match="pass tokens"):
        Clusterer(4, random_state=0, max_token_multiple=2.0).fit(x)
    with pytest.raises(ValueError, match="tokens must be 240 finite counts"):
        Clusterer(4, random_state=0, max_token_multiple=2.0).fit(x, tokens[:-1])


def reference_fit(X, k, batch_size, seed):
    """Clusterer.fit of cluster-1 (whole pool in memory), frozen here to prove the streamed rewrite equal; since
    cluster-4 the member sums are float64 (exact, so how the pool is cut into shards does not matter)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = X.shape[0]
    km = MiniBatchKMeans(n_clusters=k, batch_size=batch_size, n_init=3, max_iter=100, random_state=seed)
    with threadpool_limits(limits=1):
        km.fit(X)
    labels, _ = assign(X, cluster_mod._l2_normalize_rows(km.cluster_centers_))
    zero = ~np.any(X, axis=1)
    labels[zero] = km.labels_[zero]
    members = sp.csr_matrix((np.ones(n, np.float64), (labels, np.arange(n))), shape=(k, n))
    sums = np.asarray(members @ X.astype(np.float64)).astype(np.float32)
    empty = ~np.any(sums, axis=1)
    sums[empty] = km.cluster_centers_[empty]
    centroids = cluster_mod._l2_normalize_rows(sums)
    cos = np.einsum("ij,ij->i", X, centroids[labels])
    distances = np.clip(1.0 - cos, 0.0, 2.0).astype(np.float32)
    sizes = np.bincount(labels, minlength=k).astype(np.int64)
    sq_x = np.einsum("ij,ij->i", X, X, dtype=np.float64)
    sq_c = np.einsum("ij,ij->i", centroids, centroids, dtype=np.float64)[labels]
    inertia = float(np.maximum(sq_x + sq_c - 2.0 * cos, 0.0).sum())
    return labels, centroids, distances, sizes, inertia


def with_zero_rows(x, rows):
    x = x.copy()
    x[rows] = 0.0
    return x


POOLS = {
    "blobs": (blobs(n_per=40, groups=4, noise=0.3, seed=3)[0], 6),
    "zero vectors": (with_zero_rows(blobs(n_per=30, seed=4)[0], [0, 17, 55, 89]), 4),
    "empty clusters": (unit(np.repeat(np.eye(4, dtype=np.float32)[:2], 10, axis=0)), 5),
}


@pytest.mark.parametrize("pool", POOLS)
def test_fit_is_identical_to_the_whole_pool_clusterer_it_replaces(pool):
    x, k = POOLS[pool]
    labels, centroids, distances, sizes, inertia = reference_fit(x, k, 64, 7)
    model = Clusterer(k, batch_size=64, random_state=7).fit(x)
    assert np.array_equal(model.labels_, labels) and model.labels_.dtype == np.int32
    assert model.centroids_.tobytes() == centroids.tobytes()
    assert model.distances_.tobytes() == distances.tobytes()
    assert np.array_equal(model.sizes_, sizes) and model.inertia_ == inertia


def stream(x, k, sample, batch, seed=0, batch_size=64):
    """The task's streamed path on an in-memory pool: fit on a seeded sample, two passes of `batch` rows."""
    model = Clusterer(k, batch_size=batch_size, random_state=seed).fit_sample(x[sample_rows(len(x), sample, seed)])
    for a in range(0, len(x), batch):
        model.partial_assign(x[a : a + batch])
    model.finalize()
    parts = [model.partial_distances(x[a : a + batch]) for a in range(0, len(x), batch)]
    return model, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_streaming_the_whole_pool_as_one_batch_is_fit():
    x, k = POOLS["zero vectors"]
    fitted = Clusterer(k, batch_size=64, random_state=0).fit(x)
    model, labels, distances = stream(x, k, sample=len(x), batch=len(x))
    assert np.array_equal(labels, fitted.labels_) and np.array_equal(distances, fitted.distances_)
    assert np.array_equal(model.centroids_, fitted.centroids_) and model.inertia_ == fitted.inertia_


def test_batching_does_not_change_the_clusters():
    x, k = POOLS["blobs"]
    whole, labels, distances = stream(x, k, sample=len(x), batch=len(x))
    model, batched_labels, batched_distances = stream(x, k, sample=len(x), batch=7)
    assert np.array_equal(batched_labels, labels)
    assert np.allclose(model.centroids_, whole.centroids_, atol=1e-6)
    assert np.allclose(batched_distances, distances, atol=1e-6)
    assert np.array_equal(model.sizes_, whole.sizes_) and model.inertia_ == pytest.approx(whole.inertia_, rel=1e-6)


def test_a_model_fitted_on_a_sample_labels_every_document():
    x, y = blobs(n_per=1000, dim=16, groups=5, noise=0.1, seed=2)  # 5000 docs, k-means sees 1000
    x = with_zero_rows(x, [3, 2500, 4999])  # directionless docs outside and maybe inside the sample
    model, labels, distances = stream(x, 5, sample=1000, batch=1500, batch_size=256)
    assert labels.shape == (5000,) and labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 5
    assert model.sizes_.sum() == 5000 and np.array_equal(model.sizes_, np.bincount(labels, minlength=5))
    assert same_partition(np.delete(labels, [3, 2500, 4999]), np.delete(y, [3, 2500, 4999]))
    assert np.allclose(np.linalg.norm(model.centroids_, axis=1), 1.0, atol=1e-5)
    means = np.stack([x[labels == c].sum(axis=0) for c in range(5)])
    assert np.allclose(model.centroids_, unit(means), atol=1e-5)  # centroid = members' mean direction
    cos = np.einsum("ij,ij->i", x, model.centroids_[labels])
    assert np.allclose(distances, np.clip(1 - cos, 0, 2), atol=1e-5) and (distances[[3, 2500, 4999]] == 1).all()
    assert model.inertia_ == pytest.approx(float(((x - model.centroids_[labels]) ** 2).sum()), rel=1e-4)
    again, labels_again, distances_again = stream(x, 5, sample=1000, batch=1500, batch_size=256)
    assert np.array_equal(labels_again, labels) and np.array_equal(distances_again, distances)
    assert np.array_equal(again.centroids_, model.centroids_) and again.inertia_ == model.inertia_


def test_streaming_steps_must_come_in_order():
    x, _ = blobs(n_per=10)
    model = Clusterer(3, batch_size=64, random_state=0)
    with pytest.raises(RuntimeError, match="fit_sample"):
        model.partial_assign(x)
    model.fit_sample(x)
    with pytest.raises(RuntimeError, match="finalize"):
        model.partial_distances(x)
    with pytest.raises(ValueError, match="5 columns"):
        model.partial_assign(x[:, :5])
    model.partial_assign(x)
    model.finalize()
    with pytest.raises(RuntimeError, match="fit_sample"):
        model.partial_assign(x)  # a later batch would be left out of the centroids
    model.fit_sample(x)  # starts over
    assert model.sizes_.sum() == 0 and not hasattr(model, "centroids_")


@hsettings(max_examples=20, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(1, 9), sim_floats=st.sampled_from([1, 40, 2**25]), seed=st.integers(0, 99))
def test_assign_picks_the_most_similar_centroid_in_any_block_size(n, k, sim_floats, seed):
    rng = np.random.default_rng(seed)
    x, c = unit(rng.standard_normal((n, 5))), unit(rng.standard_normal((k, 5)))
    old = cluster_mod._SIM_FLOATS, cluster_mod._BLOCK
    cluster_mod._SIM_FLOATS, cluster_mod._BLOCK = sim_floats, 4  # blocks of 4.. rows
    try:
        labels, cos = assign(x, c)
    finally:
        cluster_mod._SIM_FLOATS, cluster_mod._BLOCK = old
    sim = x @ c.T
    assert np.array_equal(labels, sim.argmax(axis=1)) and np.allclose(cos, sim.max(axis=1))


def test_fit_sample_must_hold_at_least_k_documents():
    with pytest.raises(ValidationError, match="fit_sample = 1000"):
        ClusterSettings(k=1001, fit_sample=1000)
    with pytest.raises(ValidationError, match="fit_sample"):
        ClusterSettings(fit_sample=999)
    assert ClusterSettings().fit_sample == 500_000


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


def _insert_vectors(con, key, idx, x):
    """Pool vectors as the featurize stage's view shows them (key, role, doc_idx, vec float[])."""
    con.execute("create table if not exists featurize_vectors (key varchar, role varchar, doc_idx bigint, vec float[])")
    con.register("batch", vectors_batch(idx, x))
    con.execute("insert into featurize_vectors select ?, 'pool', doc_idx, vec::float[] from batch", [key])
    con.unregister("batch")


def make_features(tmp_path, x, key="features-key"):
    store = open_store(tmp_path / "store.duckdb")
    with connect(store) as con:
        _insert_vectors(con, key, np.arange(len(x)), x)
    return StageRef("featurize", key, store, len(x), "fp")


def test_task_writes_tables_that_round_trip(tmp_path):
    x, y = blobs(n_per=40, groups=4)
    features = make_features(tmp_path, x)
    settings = ClusterSettings(k=4, batch_size=64, balance="docs")
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
    first = cluster.fn(ClusterSettings(batch_size=64, balance="docs"), features, 0)
    again = cluster.fn(ClusterSettings(batch_size=64, balance="docs"), features, 0)
    assert again == first
    with connect(features.store, read_only=True) as con:
        assert con.execute("select count(*) from cluster_assignments").fetchone()[0] == 6
        assert con.execute("select k from cluster_info where key = ?", [first.key]).fetchone()[0] == 6
        assert con.execute("select count(*) from cluster_centroids").fetchone()[0] == 6
        assert con.execute("select count(*) from cluster_info").fetchone()[0] == 1


def read_partition(store, key):
    with connect(store, read_only=True) as con:
        a = con.execute("select doc_idx, cluster, distance from cluster_assignments where key = ? order by doc_idx",
                        [key]).fetchnumpy()
        c = con.execute("select cluster, size, vec from cluster_centroids where key = ? order by cluster",
                        [key]).fetchnumpy()
        k, gamma, inertia = con.execute("select k, gamma, inertia from cluster_info where key = ?", [key]).fetchone()
        pairs = load_neighbors(con, key)
    return a, c["size"], np.stack(c["vec"]).astype(np.float32), (k, gamma, inertia), pairs


def test_task_on_a_pool_within_fit_sample_writes_what_the_whole_pool_clusterer_did(tmp_path, monkeypatch):
    x, k = POOLS["zero vectors"]  # 90 docs
    monkeypatch.setattr(cluster_mod, "STREAM_ROWS", 25)  # read for the fit in 4 batches
    features = make_features(tmp_path, x)
    ref = cluster.fn(ClusterSettings(k=k, batch_size=64, balance="docs"), features, 3)
    labels, centroids, distances, sizes, inertia = reference_fit(x, k, 64, 3)
    a, got_sizes, got_centroids, (got_k, gamma, got_inertia), pairs = read_partition(features.store, ref.key)
    assert np.array_equal(a["doc_idx"], np.arange(len(x))) and np.array_equal(a["cluster"], labels)
    assert a["distance"].tobytes() == distances.tobytes() and got_centroids.tobytes() == centroids.tobytes()
    assert np.array_equal(got_sizes, sizes) and got_inertia == inertia and got_k == k
    expected_pairs, expected_gamma = neighbor_graph(centroids)
    assert gamma == expected_gamma and pairs.equals(expected_pairs)


def test_task_streams_a_pool_larger_than_fit_sample(tmp_path):
    x, y = blobs(n_per=1000, dim=16, groups=5, noise=0.1, seed=5)  # 5000 docs
    run = RunSettings(shard_docs=1500)  # 3 full shards and a partial one, each pass
    features = make_features(tmp_path, x)
    settings = ClusterSettings(k=5, batch_size=256, fit_sample=1000, balance="docs")
    ref = cluster.fn(settings, features, 0, run=run)
    assert ref.rows == 5000
    model, labels, distances = stream(x, 5, sample=1000, batch=1500, batch_size=256)
    a, sizes, centroids, (k, gamma, inertia), pairs = read_partition(features.store, ref.key)
    assert np.array_equal(a["doc_idx"], np.arange(5000)) and np.array_equal(a["cluster"], labels)
    assert np.array_equal(a["distance"], distances) and same_partition(a["cluster"], y)
    assert sizes.sum() == 5000 and np.array_equal(sizes, np.bincount(a["cluster"], minlength=5))
    assert np.array_equal(centroids, model.centroids_) and k == 5
    assert inertia == pytest.approx(model.inertia_, rel=1e-12)  # shard sums added exactly (fsum), not in turn
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    assert pairs.equals(neighbor_graph(model.centroids_)[0])
    assert cluster.fn(settings, features, 0, run=run) == ref  # rerun: same rows, still one partition
    assert cluster.fn(settings, features, 0, run=RunSettings(shard_docs=5000)) == ref  # one shard: the same
    other = cluster.fn(settings, features, 1, run=run)  # another seed samples other documents
    assert other.key != ref.key
    with connect(features.store, read_only=True) as con:
        counts = con.execute("select key, count(*) from cluster_assignments group by key").fetchall()
    assert sorted(n for _, n in counts) == [5000, 5000]


def test_task_clamps_auto_k_to_the_fit_sample(tmp_path, monkeypatch, caplog):
    x, _ = blobs(n_per=400, dim=8, groups=3, seed=6)  # 1200 docs
    monkeypatch.setattr(cluster_mod, "auto_k", lambda n: 1100)
    features = make_features(tmp_path, x)
    with caplog.at_level(logging.WARNING, logger="quadflow"):
        ref = cluster.fn(ClusterSettings(batch_size=1024, fit_sample=1000, balance="docs"), features, 0)
    assert "fit sample's 1000 documents; using k = 1000" in caplog.text
    with connect(features.store, read_only=True) as con:
        assert con.execute("select k from cluster_info where key = ?", [ref.key]).fetchone()[0] == 1000
        assert con.execute("select count(*) from cluster_assignments").fetchone()[0] == 1200


def test_task_rejects_pools_it_cannot_stream(tmp_path):
    store = open_store(tmp_path / "store.duckdb")
    x = unit(np.random.default_rng(0).standard_normal((6, 4)))
    with connect(store) as con:
        for key, idx, vecs in [("gap", [0, 1, 3], x[:3]), ("widths", [0, 1, 2], x[:3]), ("widths", [3], x[3:4, :3])]:
            _insert_vectors(con, key, np.array(idx), vecs)
    with pytest.raises(ValueError, match=r"not dense 0..2 \(runs 0..3\)"):
        cluster.fn(ClusterSettings(k=2, balance="docs"), StageRef("featurize", "gap", store, 3, "fp"), 0)
    with pytest.raises(ValueError, match="to [34] dims, expected 4"):
        cluster.fn(ClusterSettings(k=2, balance="docs"), StageRef("featurize", "widths", store, 4, "fp"), 0)
    with pytest.raises(ValueError, match="no pool vectors"):
        cluster.fn(ClusterSettings(k=2, balance="docs"), StageRef("featurize", "none", store, 0, "fp"), 0)


def make_docs(store, tokens, key="ingest-key"):
    """An ingest partition's pool documents with these token counts (the cluster stage reads only those)."""
    with connect(store) as con:
        run_sql(con, "ingest_schema")
        n = len(tokens)
        con.execute(
            "insert into ingest_docs select ?, 'pool', i, 'h' || i, null, 'text', t, 4 * t, 'src', 'f', i + 1, null "
            "from (select unnest(range(?)) as i, unnest(?::bigint[]) as t)", [key, n, [int(t) for t in tokens]])
    return StageRef("ingest", key, store, len(tokens), "fp")


def test_task_balances_clusters_by_the_docs_token_counts(tmp_path, monkeypatch):
    """The default (balance = tokens) reads the fit sample's token counts from the ingest partition and
    writes the split clusters: k in cluster_info, one centroid row per cluster, dense ids."""
    x, y, tokens = heavy_pool(seed=1)
    monkeypatch.setattr(cluster_mod, "STREAM_ROWS", 100)
    features = make_features(tmp_path, x)
    docs = make_docs(features.store, tokens)
    settings = ClusterSettings(k=4, batch_size=64, max_token_multiple=2.0)
    assert settings.balance == "tokens"
    ref = cluster.fn(settings, features, 0, docs)
    model = Clusterer(4, 64, 0, max_token_multiple=2.0).fit(x, tokens)
    a, sizes, centroids, (k, gamma, inertia), pairs = read_partition(features.store, ref.key)
    assert k == model.k_ > 4 and len(sizes) == k and np.array_equal(a["cluster"], model.labels_)
    assert np.array_equal(sizes, model.sizes_) and np.array_equal(centroids, model.centroids_)
    assert np.bincount(a["cluster"], weights=tokens).max() <= 2.0 / 4 * tokens.sum()
    # streamed (pool larger than the fit sample): the sample's own token counts are read
    x2, y2 = blobs(n_per=600, dim=8, groups=4, noise=0.1, seed=2)
    tok2 = np.where(y2 == 0, 1000, 10)
    (tmp_path / "b").mkdir()
    f2 = make_features(tmp_path / "b", x2)
    d2 = make_docs(f2.store, tok2)
    big = ClusterSettings(k=4, batch_size=256, fit_sample=1000, max_token_multiple=2.0)
    ref2 = cluster.fn(big, f2, 0, d2)
    rows = sample_rows(len(x2), 1000, 0)
    m2 = Clusterer(4, 256, 0, max_token_multiple=2.0).fit_sample(x2[rows], tok2[rows])
    a2, *_ = read_partition(f2.store, ref2.key)
    for lo in range(0, len(x2), 100):
        m2.partial_assign(x2[lo:lo + 100])
    m2.finalize()
    expected = np.concatenate([m2.partial_distances(x2[lo:lo + 100])[0] for lo in range(0, len(x2), 100)])
    assert m2.k_ > 4 and np.array_equal(a2["cluster"], expected)


def test_task_balancing_by_tokens_needs_the_docs_ref(tmp_path):
    x, _, _ = heavy_pool()
    features = make_features(tmp_path, x)
    with pytest.raises(ValueError, match="balance = 'tokens'.*pass the docs ref"):
        cluster.fn(ClusterSettings(k=4), features, 0)
    make_docs(features.store, np.ones(240, dtype=np.int64), key="another-partition")
    with pytest.raises(ValueError, match="0 of the 240 sampled documents found"):
        cluster.fn(ClusterSettings(k=4), features, 0, StageRef("ingest", "missing", features.store, 240, "fp"))
