"""End to end: the curate flow on the shipped sample against a real (temporary) Prefect server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import polars as pl
import pytest

from tests.conftest import SAMPLE_POOL, SAMPLE_TARGET, task_run_states

pytestmark = pytest.mark.e2e

STAGES = ("ingest", "dedup", "featurize", "cluster", "semdedup", "score", "select", "export", "report")
BUDGET = 100_000

GOOD_DOC = (
    "The for statement in Python differs a bit from what you may be used to in C. Rather than "
    "always iterating over an arithmetic progression of numbers, Python's for statement iterates "
    "over the items of any sequence, in the order that they appear in the sequence. If you need to "
    "modify the collection while iterating over it, it is usually easier to loop over a copy."
)


def _bad_file(path: Path) -> dict[int, str]:
    """A JSONL file mixing good records with one of each kind of bad record; returns line -> reason."""
    lines: list[bytes] = [
        json.dumps({"id": "good-1", "text": GOOD_DOC, "source": "handwritten"}).encode(),  # 1
        b'{"id": "bad-json", "text": "unterminated',  # 2
        b"[1, 2, 3]",  # 3
        json.dumps({"id": "no-text", "body": "text is missing"}).encode(),  # 4
        json.dumps({"id": "number", "text": 42}).encode(),  # 5
        json.dumps({"id": "blank", "text": "   \n  "}).encode(),  # 6
        b'{"id": "latin1", "text": "caf\xe9 au lait"}',  # 7
        json.dumps({"id": "huge", "text": "word " * 5000}).encode(),  # 8 (25,000 chars)
        json.dumps({"id": "good-2", "text": GOOD_DOC.replace("Python", "Python 3"), "source": "handwritten"}).encode(),  # 9
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return {2: "malformed_json", 3: "not_an_object", 4: "missing_text", 5: "wrong_type",
            6: "empty_text", 7: "undecodable", 8: "oversize"}


def _settings(tmp: Path, store: Path, output: Path, extra_inputs=(), **score):
    from quadflow.settings import build_settings

    return build_settings(overrides={
        "store": str(store),
        "seed": 7,
        "ingest": {"inputs": [str(SAMPLE_POOL), *map(str, extra_inputs)], "targets": [str(SAMPLE_TARGET)],
                   "max_doc_chars": 20_000},
        "score": {"scorers": ["heuristic", "dsir", "classifier"], **score},
        "select": {"selector": "quad", "budget_tokens": BUDGET},
        "export": {"output": str(output)},
    })


def _run(settings):
    from quadflow.flows.curate import curate

    state = curate(settings=settings, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    states = task_run_states(state.state_details.flow_run_id, STAGES)
    result["_flow_run_id"] = state.state_details.flow_run_id
    return result, states


def _artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def _selected_ids(output: Path) -> list[str]:
    return pl.read_parquet(output / "selection.parquet")["id"].to_list()


@pytest.fixture(scope="module")
def first_run(prefect_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    bad = tmp / "mixed.jsonl"
    expected_bad = _bad_file(bad)
    settings = _settings(tmp, tmp / "store.duckdb", tmp / "out", extra_inputs=[bad])
    result, states = _run(settings)
    return {"tmp": tmp, "bad": bad, "expected_bad": expected_bad, "settings": settings,
            "result": result, "states": states, "first_ids": _selected_ids(tmp / "out")}


def test_first_run_computes_every_stage_and_publishes(first_run):
    states, result = first_run["states"], first_run["result"]
    for stage in STAGES:
        assert states[stage] == "Completed", (stage, states)
    out = first_run["tmp"] / "out"
    assert Path(result["selection"]) == out / "selection.parquet"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["selected_tokens"] == result["tokens"]
    assert (out / "report" / "report.md").exists()

    sel = pl.read_parquet(out / "selection.parquet")
    assert 0.98 * BUDGET <= sel["n_tokens"].sum() <= BUDGET
    assert sel["id"].n_unique() == sel.height
    assert {"id", "text", "cluster", "score_combined", "reason"} <= set(sel.columns)
    assert set(sel["reason"].unique()) <= {"quad_target_kind", "quad_likely_target_kind", "quad_related", "quad_fill"}


def test_run_leaves_report_tables_link_and_progress_artifacts(first_run):
    arts = _artifacts(first_run["result"]["_flow_run_id"])
    keys = {a.key for a in arts if a.key}
    assert {"quadflow-report", "quadflow-output", "quadflow-bandit-rounds", "quadflow-selection-by-source",
            "quadflow-selection-by-cluster"} <= keys
    report = next(a for a in arts if a.key == "quadflow-report")
    assert "KL reduction" in report.data
    progress = [a for a in arts if a.type == "progress"]
    assert progress and all(float(a.data) == 100.0 for a in progress)  # every long stage finished its bar


def test_store_holds_every_stage(first_run):
    store = first_run["tmp"] / "store.duckdb"
    with duckdb.connect(str(store), read_only=True) as con:
        for table in ("ingest_docs", "ingest_quarantine", "featurize_vectors", "featurize_ngrams",
                      "cluster_assignments", "cluster_centroids", "score_docs", "select_rounds",
                      "select_probes", "select_selection", "export_runs"):
            assert con.execute(f"select count(*) from {table}").fetchone()[0] > 0, table
        n_rounds = con.execute("select count(distinct round) from select_rounds").fetchone()[0]
        accepted = con.execute("select count(*) from select_rounds where accepted").fetchone()[0]
    assert n_rounds >= 1 and accepted >= 1


def test_bad_records_are_quarantined_with_reason_and_good_ones_kept(first_run):
    store, bad = first_run["tmp"] / "store.duckdb", first_run["bad"]
    with duckdb.connect(str(store), read_only=True) as con:
        rows = con.execute(
            "select line, reason from ingest_quarantine where file like ? order by line", [f"%{bad.name}"]
        ).fetchall()
        good = con.execute(
            "select line from ingest_docs where role = 'pool' and file like ? order by line", [f"%{bad.name}"]
        ).fetchall()
    assert dict(rows) == first_run["expected_bad"]
    assert [g[0] for g in good] == [1, 9]
    summary = first_run["result"]["summary"]
    assert summary["quarantined"] == len(first_run["expected_bad"])


def test_rerun_unchanged_recomputes_nothing(first_run):
    result, states = _run(first_run["settings"])
    for stage in STAGES:
        assert states[stage] == "Cached", (stage, states)
    assert result["selection"] == first_run["result"]["selection"]


def test_changing_a_scorer_setting_recomputes_only_scoring_onwards(first_run):
    settings = first_run["settings"]
    changed = settings.model_copy(update={"score": settings.score.model_copy(update={"classifier_negative_docs": 3})})
    _, states = _run(changed)
    for stage in ("ingest", "dedup", "featurize", "cluster", "semdedup"):
        assert states[stage] == "Cached", (stage, states)
    for stage in ("score", "select", "export", "report"):
        assert states[stage] == "Completed", (stage, states)


def test_deleted_store_recomputes_everything_with_identical_selection(first_run):
    tmp = first_run["tmp"]
    (tmp / "store.duckdb").unlink()
    shutil.rmtree(tmp / "out")
    result, states = _run(first_run["settings"])
    for stage in STAGES:
        assert states[stage] == "Completed", (stage, states)
    assert _selected_ids(tmp / "out") == first_run["first_ids"]


def test_the_readme_command_runs_on_prefects_temporary_server_with_worker_processes(tmp_path):
    """`quadflow run` with no Prefect server configured: it starts the temporary server, shard tasks run in
    a local process pool that reports to it, and the run ends with status 0 and no lost logs."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "quadflow"), "run", "--input", str(SAMPLE_POOL), "--target",
         str(SAMPLE_TARGET), "--budget-tokens", "30000", "--store", str(tmp_path / "q.duckdb"), "--output",
         str(tmp_path / "out"), "--shard-docs", "1500", "--workers", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "selected " in out and "Error logging to API" not in out
    assert "featurize: 4 shards: 4 computed" in out and "Starting temporary server" in out
    assert out.count("Starting temporary server") == 1  # the workers used the run's server, not their own
    assert (REPO / "quadflow.duckdb").exists() is False
