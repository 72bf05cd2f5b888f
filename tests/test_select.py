"""The select task on a DuckDB store under tmp_path holding hand-made upstream partitions."""

from __future__ import annotations

import duckdb
import numpy as np
import polars as pl
import pytest

from quadflow.settings import SelectSettings
from quadflow.store import StageRef, open_store
from quadflow.tasks.select import select
from tests.test_score_task import TOTALS_FROM_NGRAMS

N_POOL, N_TARGET, K, BUCKETS = 600, 40, 6, 64

UPSTREAM_DDL = """
create table ingest_docs (key varchar, role varchar, doc_idx bigint, doc_id varchar, source_id varchar,
    text varchar, n_tokens bigint, n_chars bigint, source varchar, file varchar, line bigint, fields json);
create table featurize_ngrams (key varchar, role varchar, doc_idx bigint, buckets usmallint[], counts usmallint[]);
create table cluster_assignments (key varchar, doc_idx bigint, cluster integer, distance float);
create table cluster_neighbors (key varchar, cluster integer, neighbor integer, distance float);
create table cluster_info (key varchar, k integer, gamma double, inertia double);
create table score_docs (key varchar, doc_idx bigint, scorer varchar, version varchar, score double, detail varchar);
create table featurize_info (key varchar, version varchar, n_features integer, dsir_buckets integer, dim integer,
    max_chars integer, svd_docs bigint, explained_variance double, pool_docs bigint, target_docs bigint);
"""


def _ref(stage, key, store, rows):
    return StageRef(stage=stage, key=key, store=store, rows=rows, fingerprint=f"{rows}:{key}")


def _insert(con, table, frame: pl.DataFrame):
    con.register("frame", frame.to_arrow())
    con.execute(f"insert into {table} by name select * from frame")
    con.unregister("frame")


@pytest.fixture()
def upstream(tmp_path):
    """A store with one partition per upstream stage (plus decoy partitions the task must ignore)."""
    store = open_store(tmp_path / "store.duckdb")
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 200, N_POOL)
    labels = rng.integers(0, K, N_POOL)
    quality = np.linspace(0.1, 0.9, K)
    scores = np.clip(quality[labels] + rng.normal(0, 0.1, N_POOL), 0, 1)
    with duckdb.connect(store.path) as con:
        con.execute(UPSTREAM_DDL)
        for role, n in (("pool", N_POOL), ("target", N_TARGET)):
            toks = tokens if role == "pool" else rng.integers(5, 200, n)
            _insert(con, "ingest_docs", pl.DataFrame({
                "key": "docs", "role": role, "doc_idx": np.arange(n), "doc_id": [f"{role}-{i}" for i in range(n)],
                "text": [f"text {i}" for i in range(n)], "n_tokens": toks, "n_chars": 5 * toks,
                "source": "synthetic", "file": "f.jsonl", "line": np.arange(n) + 1}))
            # Target docs and odd pool docs use the low quarter of the buckets, even pool docs all of
            # them: DSIR importance weights favour the odd pool docs.
            wide = np.array([role == "pool" and i % 2 == 0 for i in range(n)])
            buckets = [np.unique(rng.integers(0, BUCKETS if w else BUCKETS // 4, 8)) for w in wide]
            _insert(con, "featurize_ngrams", pl.DataFrame({
                "key": "feat", "role": role, "doc_idx": np.arange(n),
                "buckets": [b.tolist() for b in buckets],
                "counts": [rng.integers(1, 4, b.size).tolist() for b in buckets]}))
        con.execute(TOTALS_FROM_NGRAMS)
        con.execute("insert into featurize_info (key, version, n_features, dsir_buckets, dim, max_chars, svd_docs, "
                    "explained_variance, pool_docs, target_docs) values ('feat', 'f1', 1024, ?, 8, 100, ?, 0.5, ?, ?)",
                    [BUCKETS, N_POOL, N_POOL, N_TARGET])
        _insert(con, "cluster_assignments", pl.DataFrame({
            "key": "clu", "doc_idx": np.arange(N_POOL), "cluster": labels.astype(np.int32), "distance": 0.1}))
        _insert(con, "cluster_neighbors", pl.DataFrame({
            "key": "clu", "cluster": [0, 1, 4, 5], "neighbor": [1, 0, 5, 4], "distance": [0.05, 0.05, 0.1, 0.1]}))
        con.execute("insert into cluster_info values ('clu', ?, 0.2, 1.0)", [K])
        for key, scorer, values in (("sco", "combined", scores), ("sco", "heuristic", 1 - scores),
                                    ("other", "combined", 1 - scores)):  # decoy partition: inverted scores
            _insert(con, "score_docs", pl.DataFrame({
                "key": key, "doc_idx": np.arange(N_POOL), "scorer": scorer, "version": "v1", "score": values,
                "detail": ""}))
        con.execute("insert into cluster_info values ('clu-old', 3, 0.5, 2.0)")  # decoy cluster partition
    refs = dict(docs=_ref("ingest", "docs", store, N_POOL + N_TARGET), features=_ref("featurize", "feat", store, 0),
                clusters=_ref("cluster", "clu", store, N_POOL), scores=_ref("score", "sco", store, N_POOL))
    return {"store": store, "refs": refs, "tokens": tokens, "labels": labels, "scores": scores}


def _rows(store, sql, params=()):
    with duckdb.connect(store.path, read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def test_quad_random_blocks_writes_every_table(upstream):
    store, refs = upstream["store"], upstream["refs"]
    budget = int(upstream["tokens"].sum() * 0.2)
    settings = SelectSettings(selector="quad", blocks="random", budget_tokens=budget, arms_per_round=3, probes=4,
                              max_rounds=4)
    ref = select.fn(settings, seed=1, **refs)
    assert ref.stage == "select" and ref.store == store
    key = ref.key
    sel = _rows(store, "select doc_idx, rank, cluster, round, reason from select_selection where key = ? "
                       "order by rank", [key])
    assert ref.rows == len(sel) > 0
    assert [r[1] for r in sel] == list(range(len(sel)))
    idx = np.array([r[0] for r in sel])
    assert 0.98 * budget <= upstream["tokens"][idx].sum() <= budget
    assert [r[2] for r in sel] == upstream["labels"][idx].tolist()
    assert {r[4] for r in sel} <= {"quad_block", "quad_fill"}
    assert all((r[3] is None) == (r[4] == "quad_fill") for r in sel)

    rounds = _rows(store, "select round, cluster, accepted, tokens_accepted from select_rounds where key = ?", [key])
    assert 0 < len(rounds) <= 4 * 3
    blocks = sum(r[3] for r in rounds)
    assert blocks == upstream["tokens"][[r[0] for r in sel if r[4] == "quad_block"]].sum()
    probes = _rows(store, "select round, count(*) from select_probes where key = ? group by round order by round", [key])
    assert probes[0] == (0, SelectSettings().calibration_blocks * 4)  # calibration probes
    arms = _rows(store, "select cluster, size, direct_pulls from select_arms where key = ? order by cluster", [key])
    assert [a[0] for a in arms] == list(range(K))
    assert [a[1] for a in arms] == np.bincount(upstream["labels"], minlength=K).tolist()
    assert sum(a[2] for a in arms) == len(rounds)
    info = dict(_rows(store, "select name, value from select_info where key = ?", [key]))
    assert info["selector"] == "quad" and int(info["budget_tokens"]) == budget
    assert int(info["docs_selected"]) == len(sel) and float(info["fill_fraction"]) >= 0.98
    for name in ("tau", "alpha", "block_docs", "rounds", "docs_probed", "tokens_selected"):
        assert info[name] is not None, name

    # The bandit read the 'combined' scores of its own partition: the best cluster gets the most blocks.
    good = _rows(store, "select cluster, count(*) filter (where accepted) from select_rounds where key = ? "
                        "group by cluster order by 2 desc, 1 limit 1", [key])
    assert good[0][0] >= K // 2


def test_quad_ranked_blocks_writes_every_table(upstream):
    store, refs = upstream["store"], upstream["refs"]
    tokens, scores = upstream["tokens"], upstream["scores"]
    budget = int(tokens.sum() * 0.2)
    settings = SelectSettings(budget_tokens=budget, arms_per_round=3, probes=4, rounds=5, candidate_multiple=2)
    ref = select.fn(settings, seed=1, **refs)
    key = ref.key
    sel = _rows(store, "select doc_idx, rank, cluster, round, reason from select_selection where key = ? "
                       "order by rank", [key])
    idx = np.array([r[0] for r in sel])
    assert ref.rows == len(sel) > 0 and 0.98 * budget <= tokens[idx].sum() <= budget
    assert [r[2] for r in sel] == upstream["labels"][idx].tolist()
    # no classifier ran, so no document is known to be of the target's kind: the candidates are related
    assert {r[4] for r in sel} <= {"quad_related", "quad_fill"}
    assert all((r[3] is None) == (r[4] == "quad_fill") for r in sel)
    # candidates are the best documents by the combined score holding 2x the budget
    related = idx[[r[4] == "quad_related" for r in sel]]
    order = np.argsort(-scores, kind="stable")
    cutoff = scores[order[np.searchsorted(np.cumsum(tokens[order]), 2 * budget)]]
    assert related.size and (scores[related] >= cutoff).all()

    rounds = _rows(store, "select round, cluster, accepted, tokens_accepted, block_docs from select_rounds "
                          "where key = ?", [key])
    assert rounds and max(r[0] for r in rounds) <= settings.max_rounds
    assert sum(r[3] for r in rounds) == tokens[related].sum()
    assert all(len([r for r in rounds if r[0] == rnd]) <= 3 for rnd in {r[0] for r in rounds})  # B arms a round
    calib = _rows(store, "select cluster, count(*) from select_probes where key = ? and round = 0 group by 1", [key])
    assert all(n <= 4 for _, n in calib)  # round 0 probes every arm with candidates, m at most
    info = dict(_rows(store, "select name, value from select_info where key = ?", [key]))
    assert info["blocks"] == "ranked" and info["rank_scorer"] == "combined" and info["theta"] is None
    assert info["probe_scorer"] == "combined" and int(info["round_tokens"]) == -(-budget // 5)


def test_rerun_is_idempotent_and_other_partitions_survive(upstream):
    store, refs = upstream["store"], upstream["refs"]
    quad = SelectSettings(budget_tokens=5000, arms_per_round=2, max_rounds=3, blocks="random")
    first = select.fn(quad, seed=0, **refs)
    again = select.fn(quad, seed=0, **refs)
    assert again == first
    other = select.fn(SelectSettings(selector="random", budget_tokens=5000), seed=0, **refs)
    assert other.key != first.key
    counts = dict(_rows(store, "select key, count(*) from select_selection group by key"))
    assert counts == {first.key: first.rows, other.key: other.rows}
    assert _rows(store, "select count(*) from select_rounds where key = ?", [first.key])[0][0] <= 6
    assert _rows(store, "select count(distinct key) from select_info")[0][0] == 2


@pytest.mark.parametrize("selector", ["random", "topk", "dsir"])
def test_baselines_write_selection_and_info_only(upstream, selector):
    store, refs = upstream["store"], upstream["refs"]
    budget = int(upstream["tokens"].sum() * 0.2)
    ref = select.fn(SelectSettings(selector=selector, budget_tokens=budget), seed=3, **refs)
    sel = _rows(store, "select doc_idx, round, reason from select_selection where key = ? order by rank", [ref.key])
    idx = np.array([r[0] for r in sel])
    assert ref.rows == len(sel) and 0.98 * budget <= upstream["tokens"][idx].sum() <= budget
    assert {r[2] for r in sel} == {selector} and all(r[1] is None for r in sel)
    for table in ("select_rounds", "select_probes", "select_arms"):
        assert _rows(store, f"select count(*) from {table} where key = ?", [ref.key])[0][0] == 0
    info = dict(_rows(store, "select name, value from select_info where key = ?", [ref.key]))
    assert info["selector"] == selector and info["tau"] is None and info["rounds"] is None
    if selector == "topk":
        # Highest combined score first (from the 'sco' partition, not the inverted decoy).
        assert upstream["scores"][idx[0]] == upstream["scores"].max()
    if selector == "dsir":
        # Odd pool docs use the target's low buckets only, so importance resampling prefers them.
        assert (idx % 2 == 1).mean() > 0.7


def test_dsir_min_tokens_takes_short_documents_last_and_is_recorded(upstream):
    store, refs = upstream["store"], upstream["refs"]
    tokens = upstream["tokens"]
    floor = int(np.median(tokens))
    budget = int(tokens[tokens >= floor].sum() * 0.5)
    ref = select.fn(SelectSettings(selector="dsir", budget_tokens=budget, dsir_min_tokens=floor), seed=3, **refs)
    query = "select doc_idx from select_selection where key = ? order by rank"
    idx = np.array([r[0] for r in _rows(store, query, [ref.key])])
    short = tokens[idx] < floor
    # Short documents only after every long one, filling the last few tokens the long ones left.
    assert idx.size and (np.diff(short.astype(int)) >= 0).all() and tokens[idx[short]].sum() < 0.05 * budget
    plain = select.fn(SelectSettings(selector="dsir", budget_tokens=budget, dsir_min_tokens=0), seed=3, **refs)
    assert plain.key != ref.key
    plain_idx = np.array([r[0] for r in _rows(store, query, [plain.key])])
    assert (tokens[plain_idx[: plain_idx.size // 2]] < floor).any()
    info = dict(_rows(store, "select name, value from select_info where key = ?", [ref.key]))
    assert info["dsir_min_tokens"] == str(floor)


def test_missing_scores_fail_with_the_table_named(upstream):
    refs = dict(upstream["refs"], scores=_ref("score", "nope", upstream["store"], 0))
    with pytest.raises(ValueError, match="score_docs"):
        select.fn(SelectSettings(budget_tokens=1000), seed=0, **refs)


@pytest.mark.parametrize("read_docs, probe_scorer", [(7, None), (128, "heuristic"), (100_000, None)])
def test_quad_ranked_scans_the_pool_in_ranges_and_selects_as_from_whole_arrays(upstream, monkeypatch, read_docs,
                                                                               probe_scorer):
    # the default selector streams the pool in doc_idx ranges, leaving out dedup's dropped documents, and keeps
    # only its candidates: every table it writes must equal the selector's on the whole pool held in arrays
    import quadflow.tasks.score as score_mod
    import quadflow.tasks.select as sel_mod
    from quadflow.store import connect, run_sql

    store, refs = upstream["store"], upstream["refs"]
    tokens, labels, scores = upstream["tokens"], upstream["labels"], upstream["scores"]
    rng = np.random.default_rng(5)
    dropped = np.sort(rng.choice(N_POOL, 150, replace=False))
    with duckdb.connect(store.path) as con:
        run_sql(con, "dedup_create")
        for key, idx in (("dd", dropped), ("dd-decoy", np.arange(0, N_POOL, 2))):  # the decoy must not count
            _insert(con, "dedup_duplicates", pl.DataFrame({
                "key": key, "doc_idx": idx, "component": 0, "representative": 0, "component_size": 2,
                "reason": "near_duplicate"}))
    dedup = (_ref("dedup", "dd", store, N_POOL),)
    # a short run with few candidates: the fill walks past them, scanning the pool again
    settings = SelectSettings(budget_tokens=int(tokens.sum() * 0.15), arms_per_round=2, probes=3, rounds=4,
                              max_rounds=2, candidate_multiple=1.5, probe_scorer=probe_scorer)
    monkeypatch.setattr(sel_mod, "READ_DOCS", read_docs)
    monkeypatch.setattr(score_mod, "ROWS_READ", max(1, read_docs // 4))  # the candidates' n-grams, in ranges too
    scans = []  # per scan: where it started, what it held after each merge, the head it kept
    rank_prefix, concat = sel_mod.rank_prefix, sel_mod.PoolBatch.concat

    def scan(*a, **kw):
        scans.append((kw.get("after"), []))
        got = rank_prefix(*a, **kw)
        scans[-1] += (got.docs.size,)
        return got

    monkeypatch.setattr(sel_mod, "rank_prefix", scan)
    monkeypatch.setattr(sel_mod.PoolBatch, "concat",
                        classmethod(lambda cls, b: scans[-1][1].append(sum(x.size for x in b)) or concat(b)))
    ref = select.fn(settings, seed=2, dedup=dedup, **refs)
    assert len(scans) >= 2 and scans[0][0] is None  # the candidates' scan, then the fill's past them
    # no scan holds more than its head and one range: memory follows the budget, not the pool
    if read_docs < 64:  # no scan holds the pool: about its head (the candidates) and a range or two
        held = max(max(h, default=0) for _, h, _ in scans)
        assert held <= scans[0][2] + 2 * read_docs < (N_POOL - 150) / 2, scans

    monkeypatch.setattr(score_mod, "ROWS_READ", 1 << 15)
    keep = np.ones(N_POOL, dtype=bool)
    keep[dropped] = False
    resolved = settings.model_copy(update={"rank_scorer": "combined", "probe_scorer": probe_scorer or "combined"})
    # a pool-wide probe scorer other than the rank score is looked up (the fixture's heuristic is 1 - combined)
    probes = {} if probe_scorer is None else {"scores": 1 - scores}
    with connect(store) as con:
        neighbors, gamma = sel_mod._neighbors(con, "clu")
        want = sel_mod.run_on_kept(keep, resolved, 2, tokens, labels, rank_scores=scores,
                                   novelty=sel_mod._novelty(con, "docs", "feat"), neighbors=neighbors, gamma=gamma,
                                   **probes)
    for name, columns in (("selection", "doc_idx, rank, cluster, round, reason"),
                          ("rounds", "round, cluster, ucb, mean_probe, reward, accepted, block_start, block_docs, "
                                     "tokens_accepted"),
                          ("probes", "round, cluster, doc_idx, score"),
                          ("arms", "cluster, reward_sum, pulls, direct_pulls, cursor, size, exhausted")):
        got = _rows(store, f"select {columns} from select_{name} where key = ? order by all", [ref.key])
        assert got == sorted(want[name].select(columns.split(", ")).rows()), name
    info = dict(_rows(store, "select name, value from select_info where key = ?", [ref.key]))
    assert {k: v for k, v in info.items() if k != "probe_seconds"} == {
        **{k: v for k, v in want["info"].iter_rows() if k != "probe_seconds"},
        "dedup_keys": "dd", "docs_dropped_by_dedup": "150"}
    fill = _rows(store, "select count(*) from select_selection where key = ? and reason = 'quad_fill'", [ref.key])
    assert fill[0][0] > 0
