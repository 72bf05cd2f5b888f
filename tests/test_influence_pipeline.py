"""The influence scorer in the pipeline: fitted by the score stage, probing for the bandit in the
select stage (only probed documents are scored), the report's count, the torch check, the flow."""

from __future__ import annotations

import io
import json
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from quadflow.settings import (ClusterSettings, ConfigError, FeaturizeSettings, ScoreSettings, SelectSettings,
                               build_settings)
from quadflow.store import StageRef, connect, open_store
from quadflow.text import count_tokens
from quadflow.tasks.select import Probe
from tests.conftest import SAMPLE_POOL, SAMPLE_TARGET

torch = pytest.importorskip("torch", reason="the influence scorer needs torch: pip install -e '.[influence]'")

HINT = "the influence scorer needs torch: pip install -e '.[influence]'"
N_POOL, N_TARGET = 500, 40
# A proxy small enough that fitting takes a second or two on one CPU core.
TINY = {"n_layers": 1, "d_model": 16, "n_heads": 2, "seq_len": 32, "steps": 15, "train_docs": 150,
        "fit_docs": 60, "reference_docs": 30, "device": "cpu"}
SCORERS = ["heuristic", "dsir", "influence"]


def _sample(path: Path, n: int, skip: int = 0) -> list[dict]:
    """The first n records (after skip) of a shipped .jsonl.zst sample."""
    rows = []
    with open(path, "rb") as raw:
        for i, line in enumerate(io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")):
            if i >= skip:
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A store with an ingest partition (real sample texts) and the real featurize and cluster stages run on it."""
    from quadflow.tasks.cluster import cluster
    from quadflow.tasks.featurize import featurize

    tmp = tmp_path_factory.mktemp("influence-pipeline")
    store = open_store(tmp / "store.duckdb")
    pool, target = _sample(SAMPLE_POOL, N_POOL), _sample(SAMPLE_TARGET, N_TARGET)
    with duckdb.connect(store.path) as con:
        con.execute("create table ingest_docs (key varchar, role varchar, doc_idx bigint, doc_id varchar, "
                    "text varchar, n_tokens bigint)")
        for role, rows in (("pool", pool), ("target", target)):
            frame = pl.DataFrame({"doc_idx": np.arange(len(rows)), "doc_id": [r["id"] for r in rows],
                                  "text": [r["text"] for r in rows],
                                  "n_tokens": [count_tokens(r["text"]) for r in rows]})
            con.register("batch", frame.to_arrow())
            con.execute("insert into ingest_docs select 'docs', ?, doc_idx, doc_id, text, n_tokens from batch", [role])
            con.unregister("batch")
    docs = StageRef("ingest", "docs", store, N_POOL + N_TARGET, "docs-fp")
    features = featurize.fn(FeaturizeSettings(dim=8, svd_sample=200, n_features=4096, dsir_buckets=1024), docs, 0)
    clusters = cluster.fn(ClusterSettings(k=12), features, 0, docs)
    tokens = np.array([count_tokens(r["text"]) for r in pool])
    return {"store": store, "docs": docs, "features": features, "clusters": clusters, "tokens": tokens}


@pytest.fixture(scope="module")
def scored(upstream):
    from quadflow.tasks.score import score

    settings = ScoreSettings(scorers=SCORERS, influence=TINY)
    ref = score.fn(settings, upstream["docs"], upstream["features"], 0)
    return {**upstream, "scores": ref, "score_settings": settings}


def _rows(store, sql, params=()):
    with connect(store, read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def _influence_params(store, key) -> dict:
    (params,) = _rows(store, "select params::varchar from score_info where key = ? and scorer = 'influence'", [key])[0]
    return json.loads(params)


def _select(scored, seed=0, **kw):
    from quadflow.tasks.select import select

    s = SelectSettings(**{"budget_tokens": int(scored["tokens"].sum() * 0.15), "arms_per_round": 4, "probes": 3,
                          "blocks": "random", "block_docs": 8, "calibration_blocks": 8, "probe_scorer": "influence",
                          **kw})
    return select.fn(s, scored["docs"], scored["features"], scored["clusters"], scored["scores"], seed)


def _info(store, key) -> dict[str, str]:
    return dict(_rows(store, "select name, value from select_info where key = ?", [key]))


# ---------------------------------------------------------------- the probe function (pure)


@settings(max_examples=40, deadline=None)
@given(rounds=st.lists(st.lists(st.integers(0, 29), min_size=1, max_size=12), min_size=1, max_size=8))
def test_probe_scores_each_document_once_and_returns_its_scores(rounds):
    truth = np.sin(np.arange(30.0))
    seen: list[int] = []

    def score_fn(idx):
        seen.extend(idx.tolist())
        return truth[idx]

    probe = Probe(score_fn, 30)
    for r in rounds:
        idx = np.array(r)
        np.testing.assert_array_equal(probe(idx), truth[idx])
    assert sorted(seen) == sorted(set(seen))  # nobody scored twice
    assert probe.docs_scored_ == len({i for r in rounds for i in r}) == len(seen)
    assert probe.calls_ <= len(rounds)  # one batched call per round at most

    lookup = Probe.lookup(truth)
    np.testing.assert_array_equal(lookup(np.array(rounds[0])), truth[rounds[0]])
    assert lookup.docs_scored_ == 30  # pool-wide: every document was scored by the score stage


# ---------------------------------------------------------------- score stage


def test_score_stage_fits_and_saves_the_state_and_scores_no_pool_rows(scored):
    from quadflow.tasks.scorers.influence.fitted import load_fitted, sha256_file

    store, key = scored["store"], scored["scores"].key
    by_scorer = dict(_rows(store, "select scorer, count(*) from score_docs where key = ? group by scorer", [key]))
    assert by_scorer == {"heuristic": N_POOL, "dsir": N_POOL, "combined": N_POOL}  # no influence rows
    (combined,) = _rows(store, "select params::varchar from score_info where key = ? and scorer = 'combined'", [key])[0]
    assert set(json.loads(combined)["components"]) == {"heuristic", "dsir"}  # combined covers pool-wide scorers

    params = _influence_params(store, key)
    path = Path(params["path"])
    assert path == Path(f"{store.path}.artifacts") / f"influence-{key}.pt" and path.is_file()
    assert params["sha256"] == sha256_file(path)
    assert params["settings"]["d_model"] == 16 and params["scorer"]["method"] == "ekfac"
    assert params["reference_docs"] == 30 and params["fit_docs"] == 60
    scorer, meta = load_fitted(path, device="cpu")
    assert meta["docs_key"] == "docs"
    assert np.isfinite(scorer.score(["A short document.", "Another one, about Python lists."])).all()


def test_score_stage_reuses_a_valid_state_and_recreates_a_missing_one(scored):
    from quadflow.tasks.score import score

    store, key = scored["store"], scored["scores"].key
    path = Path(_influence_params(store, key)["path"])
    mtime = path.stat().st_mtime_ns
    again = score.fn(scored["score_settings"], scored["docs"], scored["features"], 0)
    assert again == scored["scores"] and path.stat().st_mtime_ns == mtime  # unchanged file: reused, not refitted

    path.unlink()
    score.fn(scored["score_settings"], scored["docs"], scored["features"], 0)
    assert path.is_file() and _influence_params(store, key)["sha256"]


# ---------------------------------------------------------------- select stage


def test_select_scores_only_the_probed_documents_with_influence(scored):
    from quadflow.tasks.scorers.influence.fitted import load_fitted

    store = scored["store"]
    ref = _select(scored)
    info = _info(store, ref.key)
    probed = _rows(store, "select distinct doc_idx from select_probes where key = ? order by doc_idx", [ref.key])
    assert info["probe_scorer"] == "influence" and info["pool_docs"] == str(N_POOL)
    assert int(info["docs_scored"]) == len(probed) < N_POOL
    assert float(info["probe_seconds"]) > 0
    assert info["probe_version"] == "influence-1" and info["probe_state_sha256"]
    assert int(info["tokens_selected"]) > 0

    # the probe scores are the fitted influence scorer's scores of those documents
    rows = _rows(store, "select p.doc_idx, p.score, d.text from select_probes p join ingest_docs d "
                        "on d.key = 'docs' and d.role = 'pool' and d.doc_idx = p.doc_idx where p.key = ? "
                        "order by p.round, p.doc_idx limit 12", [ref.key])
    scorer, _ = load_fitted(_influence_params(store, scored["scores"].key)["path"], device="cpu")
    np.testing.assert_allclose([r[1] for r in rows], scorer.score([r[2] for r in rows]), rtol=1e-9, atol=1e-12)


def test_select_with_influence_is_deterministic_under_a_seed(scored):
    store = scored["store"]

    def snapshot(key):
        return (_rows(store, "select doc_idx, rank, reason from select_selection where key = ? order by rank", [key]),
                _rows(store, "select round, doc_idx, score from select_probes where key = ? "
                             "order by round, doc_idx", [key]))

    a = _select(scored, seed=3)
    first = snapshot(a.key)
    b = _select(scored, seed=3)
    assert a == b and snapshot(b.key) == first
    c = _select(scored, seed=4)
    assert snapshot(c.key)[1] != first[1]  # another seed probes other documents


def test_select_refits_a_missing_state_file(scored):
    store = scored["store"]
    path = Path(_influence_params(store, scored["scores"].key)["path"])
    path.unlink()
    ref = _select(scored, seed=5)
    assert path.is_file() and int(_info(store, ref.key)["docs_scored"]) > 0


def test_pool_wide_probe_scorer_is_looked_up_and_a_missing_one_is_named(scored):
    store = scored["store"]
    ref = _select(scored, probe_scorer="dsir")
    info = _info(store, ref.key)
    assert info["probe_scorer"] == "dsir" and info["docs_scored"] == str(N_POOL)
    dsir = dict(_rows(store, "select doc_idx, score from score_docs where key = ? and scorer = 'dsir'",
                      [scored["scores"].key]))
    probes = _rows(store, "select doc_idx, score from select_probes where key = ?", [ref.key])
    assert all(score == dsir[d] for d, score in probes)
    with pytest.raises(ConfigError, match="probe_scorer = 'classifier'.*add 'classifier' to score.scorers"):
        _select(scored, probe_scorer="classifier")


def test_influence_only_scores_nothing_pool_wide_and_needs_influence_probes(upstream):
    from quadflow.tasks.score import score

    ref = score.fn(ScoreSettings(scorers=["influence"], influence=TINY), upstream["docs"], upstream["features"], 1)
    assert ref.rows == 0
    data = {**upstream, "scores": ref}
    with pytest.raises(ConfigError, match="combined score needs a pool-wide scorer"):
        _select(data, probe_scorer="combined")
    sel = _select(data)
    assert int(_info(upstream["store"], sel.key)["docs_scored"]) < N_POOL


def test_ranked_blocks_rank_by_a_pool_wide_score_and_probe_with_influence(scored):
    ref = _select(scored, blocks="ranked", rounds=5)
    info = _info(scored["store"], ref.key)
    assert (info["blocks"], info["rank_scorer"], info["probe_scorer"]) == ("ranked", "combined", "influence")
    assert 0 < int(info["docs_scored"]) < N_POOL  # only the probed documents were scored
    assert float(info["tau_quantile"]) == 0.5  # on-demand probes judge the blocks: below-median ones are rejected
    reasons = {r for (r,) in _rows(scored["store"], "select distinct reason from select_selection where key = ?",
                                   [ref.key])}
    assert reasons <= {"quad_related", "quad_fill"} and "quad_related" in reasons


def test_report_shows_documents_scored_by_the_probe_scorer(scored):
    from quadflow.tasks.report import ReportData, build_report

    store = scored["store"]
    sel = _select(scored, seed=0)
    info = _info(store, sel.key)
    rounds = pl.DataFrame({"round": [1], "pulls": [4], "mean_reward": [0.1], "mean_probe": [0.2], "accepted": [2],
                           "acceptance": [0.5], "tokens_accepted": [100]})
    data = ReportData(
        selector="quad", budget_tokens=1000, pool_docs=N_POOL, pool_tokens=int(scored["tokens"].sum()),
        target_docs=N_TARGET, selected_docs=1, selected_tokens=100, duplicates=0, quarantined={}, k=12,
        clusters=pl.DataFrame({"cluster": [0], "pool_docs": [N_POOL], "selected_docs": [1], "selected_tokens": [100]}),
        scores={}, failed_rules=pl.DataFrame(schema={"rule": pl.String, "pool_docs": pl.Int64,
                                                     "selected_docs": pl.Int64}),
        rounds=rounds, probes={"probes": 1, "docs_probed": 1, "calibration_probes": 0}, info=info,
        sources=pl.DataFrame({"source": ["a"], "pool_tokens": [1], "selected_tokens": [1]}), ngrams=None)
    md = build_report(data)
    n, seconds = int(info["docs_scored"]), float(info["probe_seconds"])
    assert (f"| documents scored by the probe scorer | {n:,} of {N_POOL:,} ({100 * n / N_POOL:.1f}%), "
            f"{seconds:.1f} s |") in md
    assert "| probe scorer | influence |" in md


# ---------------------------------------------------------------- without torch


def test_without_torch_asking_for_influence_is_a_config_error(upstream, monkeypatch, capsys):
    import quadflow.settings as qs
    from quadflow import cli
    from quadflow.tasks.score import score

    settings = ScoreSettings(scorers=["heuristic", "influence"], influence=TINY)  # built while torch is there
    monkeypatch.setattr(qs, "influence_available", lambda: False)

    with pytest.raises(ConfigError) as err:
        score.fn(settings, upstream["docs"], upstream["features"], 0)
    assert str(err.value) == HINT
    with pytest.raises(ConfigError, match=r"score\.scorers.*needs torch: pip install -e '\.\[influence\]'"):
        build_settings(overrides={"ingest": {"inputs": ["x"], "targets": ["y"]}, "score": {"scorers": ["influence"]}})
    with pytest.raises(ConfigError, match=r"select\.probe_scorer.*needs torch"):
        build_settings(overrides={"ingest": {"inputs": ["x"]}, "select": {"probe_scorer": "influence"}})
    # the command line: exit 2 with the message, before any work
    assert cli.main(["run", "--input", str(SAMPLE_POOL), "--target", str(SAMPLE_TARGET), "--scorer", "influence",
                     "--store", "/nonexistent/never-created.duckdb"]) == 2
    assert HINT in capsys.readouterr().err
    # everything else still works
    build_settings(overrides={"ingest": {"inputs": ["x"], "targets": ["y"]}, "score": {"scorers": ["dsir"]}})


# ---------------------------------------------------------------- the flow


@pytest.mark.e2e
def test_curate_flow_with_influence_probes(prefect_server, tmp_path):
    from quadflow.flows.curate import curate

    pool, target = tmp_path / "pool.jsonl", tmp_path / "target.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in _sample(SAMPLE_POOL, 400, skip=1000)))
    target.write_text("".join(json.dumps(r) + "\n" for r in _sample(SAMPLE_TARGET, 30)))
    settings = build_settings(overrides={
        "store": str(tmp_path / "store.duckdb"), "seed": 1,
        "ingest": {"inputs": [str(pool)], "targets": [str(target)]},
        "featurize": {"svd_sample": 200},
        "cluster": {"k": 10},
        "score": {"scorers": SCORERS, "influence": TINY},
        "select": {"budget_tokens": 20_000, "arms_per_round": 4, "probes": 3, "calibration_blocks": 8,
                   "probe_scorer": "influence"},
        "export": {"output": str(tmp_path / "out")},
    })
    state = curate(settings=settings, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["docs"] > 0 and result["tokens"] <= 20_000
    with duckdb.connect(str(tmp_path / "store.duckdb"), read_only=True) as con:
        info = dict(con.execute("select name, value from select_info").fetchall())
        assert con.execute("select count(*) from score_docs where scorer = 'influence'").fetchone()[0] == 0
    assert info["probe_scorer"] == "influence" and 0 < int(info["docs_scored"]) < int(info["pool_docs"])
    report = Path(result["report"]).read_text()
    assert "documents scored by the probe scorer" in report
    assert list((tmp_path / "store.duckdb.artifacts").glob("influence-*.pt"))
