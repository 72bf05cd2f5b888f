import json
import math
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from quadflow.metrics import kl_divergence
from quadflow.settings import ConfigError
from quadflow.tasks.report import ReportData, build_report, headline, publish_artifacts, report, report_from_store
from tests.test_export import K, N_POOL, SELECTED, build_store, run_export

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_report(w: dict, exported):
    return report.fn(w["settings"], w["docs"], w["features"], w["clusters"], w["scores"], w["selection"], exported)


def _expected_kl_reduction() -> float:
    target = np.array([18, 3, 0, 0])  # 3 target docs x [6, 1, 0, 0]
    even, odd = np.array([5, 1, 1, 1]), np.array([1, 1, 1, 5])
    raw = 10 * even + 10 * odd
    n_even = sum(1 for i in SELECTED if i % 2 == 0)
    sel = n_even * even + (len(SELECTED) - n_even) * odd
    # the store's hashed space has dsir_buckets (10,000) buckets; the rest are empty everywhere
    pad = lambda v: np.concatenate([v, np.zeros(10_000 - 4)])  # noqa: E731
    return kl_divergence(pad(target), pad(raw)) - kl_divergence(pad(target), pad(sel))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """One store, export and report shared by the tests that only read them (plots cost seconds)."""
    tmp = tmp_path_factory.mktemp("report")
    w = build_store(tmp)
    exported = run_export(w)
    with duckdb.connect(w["store"].path) as con:
        runs_before = con.execute("select * from export_runs").fetchall()
    res = run_report(w, exported)
    with duckdb.connect(w["store"].path) as con:
        runs_after = con.execute("select * from export_runs").fetchall()
    return {"tmp": tmp, "world": w, "exported": exported, "result": res,
            "runs_before": runs_before, "runs_after": runs_after}


def test_report_writes_markdown_pngs_and_summary(published):
    res = published["result"]
    d = published["tmp"] / "out" / "report"
    md = (d / "report.md").read_text()
    assert Path(res.report_path) == d / "report.md"
    for name in ("cluster_sizes.png", "score_distributions.png", "bandit_rounds.png", "source_mix.png"):
        assert f"]({name})" in md
        assert (d / name).read_bytes()[:8] == PNG_MAGIC
    assert len(res.images) == 4

    summary = json.loads((d / "summary.json").read_text())
    assert summary == res.summary
    assert summary["kl_reduction"] == pytest.approx(_expected_kl_reduction(), abs=1e-6)
    assert summary["kl_reduction"] > 0  # the selection leans to the target's bucket 0
    assert math.isfinite(summary["kl_reduction_vs_random"])  # size-matched reference is reported too
    assert summary["quarantined"] == 3 and summary["quarantined_by_reason"] == {"malformed_json": 2, "empty_text": 1}
    assert summary["cluster_coverage"] == pytest.approx(len({i % K for i in SELECTED}) / K)
    assert summary["selected_docs"] == len(SELECTED) and summary["pool_docs"] == N_POOL
    assert summary["rounds"] == 2 and summary["acceptance_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert summary["selected_by_reason"] == {"quad_block": 5, "quad_fill": len(SELECTED) - 5}

    assert "**KL reduction**" in md
    assert "| quad_fill | " + str(len(SELECTED) - 5) + " |" in md  # how much came from the fill phase
    assert "| malformed_json | 2 |" in md and "| empty_text | 1 |" in md
    assert "Exact duplicates dropped from the pool: 1." in md
    assert "| short_doc |" in md and "| no_punct |" in md  # failed heuristic rules are counted
    assert "| tau | 0.5000 |" in md and "| block size (docs) | 3 |" in md
    assert f"{len({i % K for i in SELECTED})} of {K} clusters" in md


def test_baseline_report_skips_bandit_and_target_free_kl_is_na(tmp_path):
    w = build_store(tmp_path, selector="random")
    s = w["settings"]
    w["settings"] = s.model_copy(update={"ingest": s.ingest.model_copy(update={"targets": []})})
    res = run_report(w, run_export(w))
    md = Path(res.report_path).read_text()
    assert "KL reduction: n/a: no target." in md
    assert "not applicable (selector is the 'random' baseline)" in md
    assert "bandit_rounds.png" not in md and not (Path(res.report_path).parent / "bandit_rounds.png").exists()
    assert res.summary["kl_reduction"] is None


def test_report_from_store_rebuilds_latest_run(published, tmp_path):
    w, exported = published["world"], published["exported"]
    res = report_from_store(w["store"].path, tmp_path / "elsewhere")
    assert Path(res.report_path) == tmp_path / "elsewhere" / "report" / "report.md"
    assert res.summary == published["result"].summary  # same numbers as the run's own report
    assert res.summary["selected_tokens"] == exported.tokens


def test_report_from_store_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        report_from_store(tmp_path / "missing.duckdb")
    w = build_store(tmp_path)
    with pytest.raises(ConfigError, match="no published run"):
        report_from_store(w["store"].path)


def _tiny_data(**over) -> ReportData:
    base = dict(
        selector="quad", budget_tokens=100, pool_docs=4, pool_tokens=200, target_docs=0, selected_docs=2,
        selected_tokens=90, duplicates=0, quarantined={}, k=2,
        clusters=pl.DataFrame({"cluster": [0, 1], "pool_docs": [3, 1], "selected_docs": [2, 0],
                               "selected_tokens": [90, 0]}),
        scores={"heuristic": (np.array([0.1, 0.5, np.nan, 0.9]), np.array([0.5, 0.9]))},
        failed_rules=pl.DataFrame(schema={"rule": pl.String, "pool_docs": pl.Int64, "selected_docs": pl.Int64}),
        rounds=pl.DataFrame(schema={"round": pl.Int32, "pulls": pl.Int64, "mean_reward": pl.Float64,
                                    "mean_probe": pl.Float64, "accepted": pl.Int64, "acceptance": pl.Float64,
                                    "tokens_accepted": pl.Int64}),
        probes={"probes": 0, "docs_probed": 0, "calibration_probes": 0}, info={},
        sources=pl.DataFrame({"source": ["a", "b"], "pool_tokens": [150, 50], "selected_tokens": [90, 0]}),
        ngrams=None, kl_note="no target",
    )
    return ReportData(**{**base, **over})


def test_build_report_pure_core():
    data = _tiny_data()
    h = headline(data)
    assert h["fill_fraction"] == 0.9 and h["cluster_coverage"] == 0.5 and h["kl_reduction"] is None
    md = build_report(data)
    assert "| heuristic | 4 | 0.5000 | 2 | 0.7000 | 0.2000 |" in md  # NaN scores left out of means
    assert "| a | 75.0% | 100.0% |" in md
    assert "Quarantined records: none." in md
    assert "not applicable (no bandit rounds were run)" in md
    assert publish_artifacts(data, md, "out") is False  # outside a Prefect run there is nowhere to publish to
    t, raw, sel = np.array([8.0, 2, 0]), np.array([5.0, 5, 5]), np.array([7.0, 3, 0])
    kl = headline(_tiny_data(ngrams={"target": t, "raw": raw, "selected": sel, "random": sel}))
    assert kl["kl_reduction"] == pytest.approx(kl_divergence(t, raw) - kl_divergence(t, sel), abs=1e-6)
    assert kl["kl_reduction_vs_random"] == 0.0


def test_report_leaves_other_stages_tables_alone(published):
    assert published["runs_after"] == published["runs_before"]


def test_score_plots_sample_a_big_pool_while_the_table_counts_all_of_it(published, monkeypatch):
    """Above SCORE_SAMPLE pool documents the plots draw a seeded hash sample (plus every selected
    document), so the report's memory does not grow with the pool; counts and means stay exact."""
    import quadflow.tasks.report as rep
    from quadflow.store import connect

    w = published["world"]
    keys = rep.ReportKeys(docs=w["docs"].key, clusters=w["clusters"].key, scores=w["scores"].key,
                          selection=w["selection"].key, features=w["features"].key)
    with connect(w["store"], read_only=True) as con:
        full = rep.gather_report_data(con, w["settings"], keys, "", "")
        monkeypatch.setattr(rep, "SCORE_SAMPLE", 5)
        sampled = rep.gather_report_data(con, w["settings"], keys, "", "")
        again = rep.gather_report_data(con, w["settings"], keys, "", "")
    for name, (pool, sel) in full.scores.items():
        small, small_sel = sampled.scores[name]
        assert pool.size == N_POOL and 0 < small.size < N_POOL  # a sample of the pool for the plot ...
        assert np.array_equal(np.sort(small_sel), np.sort(sel))  # ... every selected document
        assert np.array_equal(small, again.scores[name][0])  # seeded: the same sample every time
        n, mean = sampled.score_stats[name]
        assert n == N_POOL and mean == pytest.approx(pool.mean())  # the table: the whole pool


def test_bandit_table_describes_ranked_blocks_by_their_tiers_and_bar():
    from quadflow.tasks.report import _block_rows

    assert _block_rows({"blocks": "random", "block_docs": "14"}) == [["block size (docs)", 14]]
    rows = dict((k, v) for k, v in _block_rows({"blocks": "ranked", "round_tokens": "5000", "rank_scorer": "classifier",
                                                "theta": "1.3", "target_kind_tokens": "168958",
                                                "likely_target_kind_tokens": "0", "related_tokens": "7"}))
    assert rows["tokens admitted per round (the bar)"] == 5000 and rows["score of the target's own kind (theta)"] == 1.3
    assert rows["pool tokens of the target's kind / likely / related candidates"] == "168,958 / 0 / 7"
    assert _block_rows({"blocks": "ranked", "theta": None})[2][1] == "n/a (no classifier)"


HOLDER = """
import sys, time
import duckdb
from quadflow.locking import store_lock
with store_lock(sys.argv[1] + ".lock", owner="a run over the store"):
    con = duckdb.connect(sys.argv[1])  # the store open for writing, as a run's stage has it
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    con.close()
"""


def test_report_command_waits_while_a_run_holds_the_store(published, tmp_path, capsys):
    import subprocess
    import sys

    from quadflow.cli import main

    store = published["world"]["store"].path
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, store, "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        # it used to open the store at once and die with DuckDB's "Could not set lock" traceback
        assert main(["report", "--store", store, "--output", str(tmp_path)]) == 0
    finally:
        holder.wait(30)
    err = capsys.readouterr().err
    assert f"waiting for store lock {store}.lock held by a run over the store" in err
    assert (tmp_path / "report" / "report.md").exists()
