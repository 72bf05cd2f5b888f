"""Dedup: the pure cores (keys, MinHash, components, SemDeDup pairs), the tasks on a DuckDB file, resume after
SIGKILL, and a flow run whose selection never holds two members of one near-duplicate component."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import scipy.sparse as sp
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quadflow.settings import DedupSettings, RunSettings, SelectSettings, build_settings
from quadflow.store import StageRef, connect, open_store
from quadflow.tasks import dedup as dd
from quadflow.tasks.select import Novelty, Probe, run_on_kept
from tests.conftest import REPO, SAMPLE_POOL, SAMPLE_TARGET

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
LONG = ("The committee met on Tuesday to discuss the budget for the new library and agreed that the reading room "
        "needs more light while the children's section should move to the ground floor before the winter, as the "
        "architects will present their plans next month after the council has approved the first part of the money")


def _keys(text: str, s: DedupSettings = DedupSettings()) -> set[int]:
    _, offsets, keys = dd.document_keys(pl.Series([text]), s, seed=0)
    return set(keys[offsets[0]:offsets[1]].tolist())


def _edit_keys(words: list[str]) -> set[int]:
    doc, h, n = dd.word_hashes(pl.Series([" ".join(words)]))
    _, k = dd.edit_keys(doc, h, n)
    return set(k.tolist())


def _one_apart(a: list[str], b: list[str]) -> bool:
    """Brute force: equal, or equal after deleting one word of one or of each (one substitution/insertion/deletion)."""
    dels = lambda w: {tuple(w[:i] + w[i + 1:]) for i in range(len(w))}  # noqa: E731
    return a == b or tuple(a) in dels(b) or tuple(b) in dels(a) or bool(dels(a) & dels(b))


# --------------------------------------------------------------------------------------------
# Pure cores
# --------------------------------------------------------------------------------------------


def test_words_ignore_case_digits_and_punctuation():
    a = dd.word_hashes(pl.Series(["Hello, World! Release 2.1.11 (2019)"]))
    b = dd.word_hashes(pl.Series(["hello world release 3.0.14 2021"]))
    assert np.array_equal(a[1], b[1]) and a[2].tolist() == [5]  # hello world release 00000 0000


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(WORDS), min_size=1, max_size=9), st.lists(st.sampled_from(WORDS), min_size=1, max_size=9))
def test_one_edit_keys_are_shared_exactly_when_documents_are_one_word_apart(a, b):
    assert bool(_edit_keys(a) & _edit_keys(b)) == _one_apart(a, b)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="abcdefgh ", min_size=1, max_size=12), min_size=1, max_size=120))
def test_identical_documents_always_share_every_key(words):
    text = " ".join(words)
    s = DedupSettings(min_words=1, short_words=20)
    assert _keys(text, s) == _keys(text.upper() + "  ", s)


def test_a_long_document_with_one_word_changed_is_a_minhash_candidate_and_an_unrelated_one_is_not():
    edited = LONG.replace("money", "funds")  # one of 51 5-word shingles changes: Jaccard 0.96
    other = " ".join(reversed(LONG.split()))
    assert _keys(LONG) & _keys(edited)
    assert not _keys(LONG) & _keys(other)
    assert len(_keys(LONG)) == 14  # one key per band, no edit keys above short_words


def test_shingles_scale_with_document_length():
    sizes = dd.shingle_sizes(np.array([19, 25, 39, 45, 60, 500]), 5, 10)
    assert sizes.tolist() == [2, 2, 3, 4, 5, 5]
    doc = np.zeros(6, dtype=np.int64)
    h = np.arange(6, dtype=np.uint64) + np.uint64(1)
    d, s = dd.shingle_hashes(doc, h, np.array([6]), np.array([3]))
    assert d.size == 4 and np.unique(s).size == 4  # 6 words -> 4 distinct 3-word shingles


def test_minhash_estimates_jaccard_and_bands_follow_the_s_curve():
    rng = np.random.default_rng(3)
    a, b = dd.minhash_params(112, seed=5)
    trials, size = 400, 200
    for inter in (60, 150, 190):  # Jaccard inter / (2 size - inter)
        rows = []
        for _ in range(trials):
            common = rng.integers(0, 2**63, inter, dtype=np.uint64)
            rows += [np.r_[common, rng.integers(0, 2**63, size - inter, dtype=np.uint64)] for _ in range(2)]
        doc = np.repeat(np.arange(2 * trials), size)
        sig = dd.minhash_signatures(doc, np.concatenate(rows), 2 * trials, a, b)
        j = inter / (2 * size - inter)
        match = (sig[0::2] == sig[1::2]).mean(axis=1)  # (trials,) estimates
        assert abs(match.mean() - j) < 0.01, (j, match.mean())
        assert match.std() == pytest.approx(np.sqrt(j * (1 - j) / 112), rel=0.2)
        keys = dd.band_keys(sig, 14, 8)
        hit = (keys[0::2] == keys[1::2]).any(axis=1).mean()
        assert abs(hit - (1 - (1 - j**8) ** 14)) < 0.06, (j, hit)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), max_size=40))
def test_components_match_a_naive_union_find_and_keep_the_first_document(edges):
    edges = [(a, b) for a, b in edges if a != b]
    a = np.array([e[0] for e in edges], dtype=np.int64)
    b = np.array([e[1] for e in edges], dtype=np.int64)
    doc, comp, rep = dd.components(a, b)
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for x, y in edges:
        parent[find(x)] = find(y)
    nodes = sorted({x for e in edges for x in e})
    assert doc.tolist() == nodes
    for x, c, r in zip(doc.tolist(), comp.tolist(), rep.tolist()):
        members = [y for y in nodes if find(y) == find(x)]
        assert r == min(members)
        assert all(comp[doc.tolist().index(y)] == c for y in members)
    assert sorted(set(comp.tolist())) == list(range(len(set(comp.tolist()))))  # numbered 0.. by representative
    frame = dd.dropped_frame(doc, comp, rep, dd.REASON_NEAR)
    assert set(frame["doc_idx"]) == set(nodes) - set(rep.tolist())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 7), st.floats(0.001, 0.5), st.integers(0, 2**16))
def test_semantic_pairs_in_blocks_equal_the_full_similarity_matrix(n, block, eps, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    x[rng.integers(0, n, n // 2)] = x[0]  # some exact copies
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    i, j = dd.semantic_pairs(x, eps, block=block)
    sim = x @ x.T
    want = {(p, q) for p in range(n) for q in range(p + 1, n) if sim[p, q] > 1 - eps}
    assert set(zip(i.tolist(), j.tolist())) == want


def test_the_selector_sees_only_kept_documents_and_its_positions_map_back_to_the_pool():
    n = 200
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 50, n)
    clusters = rng.integers(0, 6, n)
    scores = rng.random(n)
    keep = np.ones(n, dtype=bool)
    keep[rng.choice(n, 70, replace=False)] = False
    budget = int(tokens.sum())  # room for the whole pool: everything offered is taken
    for selector, kwargs in (("random", {}), ("topk", {"scores": scores})):
        frames = run_on_kept(keep, SelectSettings(selector=selector, budget_tokens=budget), 0, tokens, clusters, **kwargs)
        assert sorted(frames["selection"]["doc_idx"].to_list()) == np.flatnonzero(keep).tolist()
    seen = []

    def score_fn(idx):  # an on-demand probe scorer gets pool doc_idx, never a dropped one
        seen.extend(idx.tolist())
        return scores[idx]

    rows_asked = []

    def rows(idx):  # the novelty discount reads n-gram rows of pool doc_idx, never a dropped one
        rows_asked.extend(idx.tolist())
        return sp.csr_matrix(np.ones((len(idx), 4)))

    novelty = Novelty(np.ones(4), np.ones(4), rows)
    for blocks, extra in (("random", {}), ("ranked", {"rank_scores": scores, "novelty": novelty})):
        settings = SelectSettings(selector="quad", blocks=blocks, budget_tokens=budget // 3, arms_per_round=3,
                                  probes=3)
        frames = run_on_kept(keep, settings, 0, tokens, clusters, probe=Probe(score_fn, n), **extra)
        assert seen and keep[seen].all()
        chosen = frames["selection"]["doc_idx"].to_numpy()
        assert keep[chosen].all() and keep[frames["probes"]["doc_idx"].to_numpy()].all()
        assert (frames["selection"]["cluster"].to_numpy() == clusters[chosen]).all()
    assert rows_asked and keep[rows_asked].all()


def test_settings_resolve_the_lsh_shape_and_name_bad_values(capsys):
    from quadflow.cli import main
    from quadflow.settings import ConfigError

    assert DedupSettings().lsh_shape() == (14, 8)  # FineWeb's
    bands, rows = DedupSettings(threshold=0.5).lsh_shape()
    assert bands * rows <= 112 and abs((1 / bands) ** (1 / rows) - 0.5) < 0.1
    with pytest.raises(ConfigError, match=r"dedup.threshold = 0.8 and dedup.bands = 10"):
        build_settings(overrides={"ingest": {"inputs": ["x"]}, "dedup": {"threshold": 0.8, "bands": 10}})
    assert main(["run", "--input", "x", "--no-dedup", "--semantic-dedup", "--show-settings"]) == 0
    shown = capsys.readouterr().out
    assert '"enabled": false' in shown and '"semantic": true' in shown


# --------------------------------------------------------------------------------------------
# Tasks on a DuckDB file
# --------------------------------------------------------------------------------------------


def _texts(n: int) -> list[str]:
    """A pool with planted near duplicates: long documents with one word changed, short ones one word apart."""
    rng = np.random.default_rng(1)
    vocab = np.array([f"word{i:x}".translate(str.maketrans("0123456789", "ghijklmnop")) for i in range(3000)])
    lengths = rng.integers(6, 90, n)
    words = vocab[rng.integers(0, vocab.size, int(lengths.sum()))].tolist()
    ends = np.cumsum(lengths).tolist()
    base = [" ".join(words[e - k:e]) for e, k in zip(ends, lengths.tolist())]
    out = []
    for i, text in enumerate(base):
        if i % 5 == 4:  # a one-word edit of an earlier document (its last word: one shingle changes)
            words = out[i - 3].split()
            words[-1] = "edited"
            text = " ".join(words)
        out.append(text)
    return out


def _store(tmp_path: Path, texts: list[str]) -> StageRef:
    store = open_store(tmp_path / "store.duckdb")
    with duckdb.connect(store.path) as con:
        con.execute("create table ingest_docs (key varchar, role varchar, doc_idx bigint, text varchar)")
        con.register("t", pa.table({"doc_idx": np.arange(len(texts), dtype=np.int64), "text": texts}))
        con.execute("insert into ingest_docs select 'ing', 'pool', doc_idx, text from t")
        con.execute("insert into ingest_docs values ('ing', 'target', 0, 'a target document is never deduplicated')")
    return StageRef("ingest", "ing", store, len(texts) + 1, "fp")


def _dropped(ref: StageRef) -> pl.DataFrame:
    with connect(ref.store, read_only=True) as con:
        return con.sql("select doc_idx, component, representative, component_size, reason from dedup_duplicates "
                       f"where key = '{ref.key}' order by doc_idx").pl()


def test_dedup_task_drops_every_planted_copy_keeps_the_first_and_is_idempotent(tmp_path, caplog):
    texts = _texts(150)
    docs = _store(tmp_path, texts)
    ref = dd.dedup.fn(DedupSettings(), docs, 0, RunSettings(shard_docs=40))
    got = _dropped(ref)
    planted = {i for i in range(150) if i % 5 == 4}
    assert set(got["doc_idx"]) == planted
    assert (got["representative"] == got["doc_idx"] - 3).all() and (got["reason"] == dd.REASON_NEAR).all()
    ledger = "select lo, hi, done_at from shard_done where stage = 'dedup' order by lo"
    with connect(docs.store, read_only=True) as con:
        before = con.execute(ledger).fetchall()
        info = dict(con.execute("select name, value from dedup_info where key = ?", [ref.key]).fetchall())
        buckets = con.execute("select count(*) from dedup_buckets where key = ?", [ref.key]).fetchone()[0]
    assert info["dropped"] == str(len(planted)) and info["enabled"] == "true" and info["bands"] == "14"
    assert info["join_ranges"] == "1"  # 150 documents: one range of keys (8 x shard_docs documents each)
    assert buckets == 150 and [(lo, hi) for lo, hi, _ in before] == [(0, 40), (40, 80), (80, 120), (120, 150)]
    # the stage's parts removed once the partition is complete; the shard texts stay for featurize and score
    assert not any(Path(f"{docs.store.path}.parts").glob("dedup-*/*"))
    kept = Path(f"{docs.store.path}.data") / "dedup" / f"key={ref.key}" / "role=pool"
    assert sorted(p.name for p in kept.iterdir()) == [f"{lo:012d}-{min(lo + 40, 150):012d}.parquet"
                                                      for lo in range(0, 150, 40)]  # read in place, not loaded
    text_files = sorted(Path(f"{docs.store.path}.parts").glob("texts-ing/in-pool-*.parquet"))
    assert len(text_files) == 4
    # written by the flow's process: LZ4, cheaper to write than zstd (what the workers' own parts use)
    assert pq.ParquetFile(text_files[0]).metadata.row_group(0).column(1).compression in ("LZ4", "LZ4_RAW")
    assert pq.ParquetFile(kept / "000000000000-000000000040.parquet").metadata.row_group(0).column(0).compression == "ZSTD"

    with caplog.at_level(logging.INFO, logger="quadflow"):  # rerun: every shard is in the ledger, its parts gone
        again = dd.dedup.fn(DedupSettings(), docs, 0, RunSettings(shard_docs=40))
    assert "rebuilt the sorted keys of 4 shards from their kept parts" in caplog.text
    with connect(docs.store, read_only=True) as con:
        assert con.execute(ledger).fetchall() == before
    other = dd.dedup.fn(DedupSettings(), docs, 0, RunSettings(shard_docs=1000))  # shard size sets memory, not results
    assert again == other == ref

    off = dd.dedup.fn(DedupSettings(enabled=False), docs, 0, RunSettings())
    assert off.rows == 0 and off.key != ref.key


def _keys_table(keys: dict[int, list[int]]) -> pa.Table:
    """dedup's keys rows (doc_idx, n_words, buckets) of {doc_idx: keys}."""
    return pa.table({"doc_idx": list(keys), "n_words": [9] * len(keys), "buckets": list(keys.values())},
                    schema=dd.KEYS_SCHEMA)


def test_star_edges_join_shared_keys_into_stars():
    bucket, doc = dd.key_pairs(_keys_table({5: [1, 2], 3: [2], 9: [2, 7], 4: [7], 6: [8]}))
    assert bucket.tolist() == [1, 2, 2, 2, 7, 7, 8] and doc.tolist() == [5, 3, 5, 9, 4, 9, 6]
    a, b = dd.star_edges(bucket, doc)
    assert list(zip(a.tolist(), b.tolist())) == [(3, 5), (3, 9), (4, 9)]  # key 2: a star at 3; key 8 is one doc's


TOP = 2**64 - 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0, 1, 5, 2**63, TOP - 1, TOP, 12345]), max_size=4), min_size=1,
                max_size=30), st.integers(1, 12), st.integers(1, 9))
def test_the_candidate_join_by_hash_range_in_shard_tasks_equals_one_join_over_every_key(keys, shard_docs, n_ranges):
    """However the pool is cut into shards and its keys into ranges (the last one ending at 2^64), the join
    tasks find the same distinct candidate edges as a star per shared key over the whole pool."""
    import tempfile

    from quadflow.shards import Parts, Shard

    by_key: dict[int, list[int]] = {}
    for d, ks in enumerate(keys):
        for k in set(ks):
            by_key.setdefault(k, []).append(d)
    expected = sorted({(min(ds), d) for ds in by_key.values() for d in ds if d != min(ds)})
    with tempfile.TemporaryDirectory() as tmp:
        parts = Parts(tmp)
        urls = []
        for lo in range(0, len(keys), shard_docs):
            shard = {d: sorted(set(keys[d])) for d in range(lo, min(lo + shard_docs, len(keys)))}
            url = dd.pairs_path(parts.output(Shard("pool", lo, lo + len(shard))))
            parts.write_parquet(url, dd.pairs_batches(*dd.key_pairs(_keys_table(shard))), schema=dd.PAIRS_SCHEMA)
            urls.append(url)
        a, b = [], []
        for i in range(n_ranges):
            result = dd.dedup_join.fn(Shard("join", i, i + 1), "", parts.output(Shard("join", i, i + 1)),
                                      tuple(urls), n_ranges, parts)
            edges = parts.read_table(result.path)
            a.append(edges["a"].to_numpy())
            b.append(edges["b"].to_numpy())
        got_a, got_b = dd.distinct_edges(np.concatenate(a), np.concatenate(b))
    assert list(zip(got_a.tolist(), got_b.tolist())) == expected


def test_semdedup_joins_near_vectors_inside_a_cluster_only_and_skips_fuzzy_drops(tmp_path):
    store = open_store(tmp_path / "s.duckdb")
    v = {0: [1, 0], 1: [1, 0.001], 2: [0, 1], 3: [1, 0.002], 4: [0.0005, 1], 5: [1, 0]}
    cluster = {0: 0, 1: 0, 2: 0, 3: 1, 4: 0, 5: 0}
    with connect(store) as con:
        from quadflow.store import run_sql

        run_sql(con, "dedup_create")
        con.execute("create table featurize_vectors (key varchar, role varchar, doc_idx bigint, vec float[])")
        con.execute("create table cluster_assignments (key varchar, doc_idx bigint, cluster integer, distance double)")
        for d, x in v.items():
            norm = float(np.hypot(*x))
            con.execute("insert into featurize_vectors values ('f', 'pool', ?, ?)", [d, [x[0] / norm, x[1] / norm]])
            con.execute("insert into cluster_assignments values ('c', ?, ?, 0)", [d, cluster[d]])
        con.execute("insert into dedup_duplicates values ('near', 5, 0, 0, 2, 'near_duplicate')")
    near = StageRef("dedup", "near", store, 1, "fp")
    feats, clus = StageRef("featurize", "f", store, 6, "fp"), StageRef("cluster", "c", store, 6, "fp")
    ref = dd.semdedup.fn(DedupSettings(semantic=True, semantic_eps=0.01), near, feats, clus)
    got = _dropped(ref)
    # 0~1 (cluster 0), 2~4 (cluster 0); 3 is close to 0 but in cluster 1; 5 was dropped by fuzzy dedup already
    assert got.select("doc_idx", "representative").rows() == [(1, 0), (4, 2)]
    assert (got["reason"] == dd.REASON_SEMANTIC).all() and got["component"].n_unique() == 2
    assert dd.semdedup.fn(DedupSettings(), near, feats, clus).rows == 0  # off by default


# --------------------------------------------------------------------------------------------
# Resume after SIGKILL
# --------------------------------------------------------------------------------------------

_RUN = """
import sys
from quadflow.settings import DedupSettings, RunSettings
from quadflow.store import StageRef, StoreRef
from quadflow.tasks.dedup import dedup
store = StoreRef(sys.argv[1], sys.argv[2])
ref = dedup.fn(DedupSettings(), StageRef("ingest", "ing", store, 0, "fp"), 0, RunSettings(shard_docs=int(sys.argv[3])))
print("REF", ref.key, ref.rows, ref.fingerprint)
"""


def test_a_dedup_killed_mid_stage_resumes_from_its_ledger_and_gives_the_same_partition(tmp_path, caplog):
    texts = _texts(3000)
    docs = _store(tmp_path, texts)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", _RUN, docs.store.path, docs.store.store_id, "300"]
    parts, kept = Path(f"{docs.store.path}.parts"), Path(f"{docs.store.path}.data")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    # finished shards: outputs not yet recorded, and recorded ones moved into the store's data directory
    while len(list(parts.glob("dedup-*/out-*.parquet"))) + len(list(kept.glob("dedup/key=*/role=*/*.parquet"))) < 3:
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with duckdb.connect(docs.store.path, read_only=True) as con:
        done_before = con.execute("select count(*) from shard_done where stage = 'dedup'").fetchone()[0]
    assert 0 < done_before < 10  # killed mid-stage

    with caplog.at_level(logging.INFO, logger="quadflow"):  # resume here: the same code, without a second import
        resumed = dd.dedup.fn(DedupSettings(), docs, 0, RunSettings(shard_docs=300))
    assert "dedup: resuming:" in caplog.text
    with duckdb.connect(docs.store.path, read_only=True) as con:
        twice = con.execute("select count(*) from (select lo from shard_done where stage = 'dedup' group by lo "
                            "having count(*) > 1)").fetchone()[0]
        computed = con.execute("select count(*) from shard_done where stage = 'dedup'").fetchone()[0]
    assert twice == 0 and computed == 10

    (tmp_path / "fresh").mkdir()
    fresh = _store(tmp_path / "fresh", texts)
    ref = dd.dedup.fn(DedupSettings(), fresh, 0, RunSettings(shard_docs=3000))
    assert (resumed.key, resumed.rows, resumed.fingerprint) == (ref.key, ref.rows, ref.fingerprint)


# --------------------------------------------------------------------------------------------
# Through the flow: the selection never holds two members of a component
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_pool(tmp_path_factory):
    from benchmarks import make_scale_pool as msp

    out = tmp_path_factory.mktemp("dedup-pool")
    msp.make_scale_pool(SAMPLE_POOL, out / "pool", msp.ScaleSpec(docs=1000, docs_per_file=1000, seed=4,
                                                                 near_dup_rate=0.3), log=lambda *_: None)
    return out


@pytest.mark.e2e
def test_the_selection_never_holds_two_members_of_a_component(prefect_server, planted_pool):
    from quadflow.flows.curate import run_curate

    def run(name: str, **dedup):
        s = build_settings(overrides={
            "store": str(planted_pool / "store.duckdb"), "seed": 1,
            "ingest": {"inputs": [str(planted_pool / "pool")], "targets": [str(SAMPLE_TARGET)]},
            "dedup": dedup, "cluster": {"k": 8},
            "select": {"selector": "quad", "budget_tokens": 10**9},  # room for everything the selector is offered
            "export": {"output": str(planted_pool / name)}, "run": {"runner": "threads"}})  # no worker start-up
        state = run_curate(s, return_state=True)
        assert state.is_completed(), state
        return state.result()

    result = run("on", semantic=True, semantic_eps=0.001)
    with duckdb.connect(result["store"], read_only=True) as con:
        sel_key = con.execute("select key from select_info where name = 'docs_selected' and value = ?",
                              [str(result["docs"])]).fetchone()[0]
        keys = con.execute("select value from select_info where key = ? and name = 'dedup_keys'", [sel_key]).fetchone()[0]
        docs_key = con.execute("select json_extract_string(value, '$') from dedup_info where key = ? and "
                               "name = 'docs_key'", [keys.split(",")[0]]).fetchone()[0]
        drops = con.execute("select d.doc_idx, d.representative, d.reason, i.doc_id, r.doc_id as rep_id "
                            "from dedup_duplicates d join ingest_docs i on i.key = $docs and i.role = 'pool' and "
                            "i.doc_idx = d.doc_idx join ingest_docs r on r.key = $docs and r.role = 'pool' and "
                            "r.doc_idx = d.representative where list_contains($keys, d.key)",
                            {"docs": docs_key, "keys": keys.split(",")}).pl()
        pool = con.execute("select count(*) from ingest_docs where role = 'pool' and key = ?", [docs_key]).fetchone()[0]
    assert drops.filter(pl.col("reason") == dd.REASON_NEAR).height > 150  # the planted one-edit copies (30%)
    assert drops.filter(pl.col("reason") == dd.REASON_SEMANTIC).height > 0
    selected = set(pl.read_parquet(result["selection"])["id"])
    assert not selected & set(drops["doc_id"])  # no dropped member is selected ...
    rep_of = dict(zip(drops["doc_id"], drops["rep_id"]))
    for doc in drops["doc_id"]:  # ... and each component keeps one: its representative, or (when semantic dedup
        while doc in rep_of:     # dropped that one) the representative's own representative
            doc = rep_of[doc]
        assert doc in selected
    assert len(selected) == pool - drops["doc_idx"].n_unique()
    assert result["summary"]["near_duplicates"] == drops.height
    report = Path(result["report"]).read_text()
    assert "| near_duplicate |" in report and "| semantic_duplicate |" in report

    off = run("off", enabled=False)  # without dedup the same budget takes both members of every component
    assert set(drops["doc_id"]) <= set(pl.read_parquet(off["selection"])["id"]) and off["docs"] == pool


def test_the_benchmark_scores_dedup_against_the_generators_ground_truth(planted_pool, tmp_path):
    from benchmarks import make_scale_pool as msp
    from benchmarks.dedup import run_dedup_stage, score_against_truth
    from quadflow.settings import IngestSettings
    from quadflow.tasks.ingest import expand_inputs, fingerprint_files, ingest

    spec = msp.ScaleSpec(docs=1000, docs_per_file=1000, seed=4, near_dup_rate=0.3)
    msp.write_ground_truth(SAMPLE_POOL, spec, tmp_path / "truth.parquet")
    truth = pl.read_parquet(tmp_path / "truth.parquet")
    assert truth.height == 1000 and (truth["kind"] == "near_duplicate").sum() > 250
    near = truth.filter(pl.col("kind") == "near_duplicate")
    assert (near["target"] < near["position"]).all() and (truth["root"] <= truth["position"]).all()

    inputs = [str(planted_pool / "pool")]
    ingest.fn(IngestSettings(inputs=inputs), fingerprint_files(expand_inputs(inputs)), (), open_store(tmp_path / "q.duckdb"))
    stage = run_dedup_stage(tmp_path / "q.duckdb")
    with connect(open_store(tmp_path / "q.duckdb"), read_only=True) as con:
        q = score_against_truth(con, stage["docs_key"], stage["ref"].key, truth, {"part-00000.jsonl.zst": 0},
                                msp.load_source(SAMPLE_POOL).texts)
    assert q["planted_near_duplicates"] == near.height
    assert q["dropped"] == stage["ref"].rows == sum(q[k] for k in ("dropped_same_planted_family", "dropped_same_source_document",
                                                                   "dropped_near_duplicate_sources", "dropped_other"))
    assert q["recall"] >= 0.95 and q["precision"] >= 0.98, q
