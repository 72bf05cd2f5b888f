"""Deployments against a real Prefect server: the scheduled nightly run, backfills, bad parameters,
and two runs over one store queueing on its lock.

One server (`prefect server start`) and one `python deployments/serve.py` per module, both
subprocesses in their own process groups, killed at teardown. The nightly deployment serves
a config of its own (QUADFLOW_CONFIG) on a one-minute cron; the tests launch runs the way the
UI's "Custom run" does, through the deployments' create-flow-run endpoint.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

from benchmarks.prefect_server import prefect_server, stop_group, tail
from quadflow.settings import Settings
from tests.conftest import REPO, SAMPLE_TARGET

pytestmark = pytest.mark.e2e

D19, D20, D21 = date(2026, 11, 19), date(2026, 11, 20), date(2026, 11, 21)
BUDGET = 30_000
SAMPLE_DOCS = 1_500  # of the shipped sample: 500 documents per partition keeps each run short
RUN_TIMEOUT = 170.0  # s for a launched run to finish (runs start as subprocesses on 2 busy cores)


def _load_demo_partitions():
    spec = importlib.util.spec_from_file_location("demo_partitions", REPO / "deployments" / "demo_partitions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _settings_dict(tmp: Path, name: str) -> dict[str, Any]:
    """Settings over the test's partition root with their own store and output (`name`)."""
    return {
        "store": str(tmp / name / "work" / "quadflow.duckdb"),
        "seed": 3,
        "ingest": {"inputs": [str(tmp / "pool")], "targets": [str(SAMPLE_TARGET)]},
        "score": {"scorers": ["heuristic"]},
        "select": {"selector": "quad", "budget_tokens": BUDGET},
        "export": {"output": str(tmp / name / "output")},
    }


@dataclass
class Stack:
    tmp: Path
    url: str
    env: dict[str, str]
    nightly_settings: dict[str, Any]
    serve_log: Path
    started: float


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    tmp = tmp_path_factory.mktemp("deploy")
    _load_demo_partitions().split_sample(tmp / "pool", [D19, D20, D21], limit=SAMPLE_DOCS)
    nightly = _settings_dict(tmp, "nightly")
    config = tmp / "nightly.yaml"
    config.write_text(yaml.safe_dump(nightly))

    extra = {
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp / "results"),
        "QUADFLOW_CONFIG": str(config),
        "QUADFLOW_NIGHTLY_CRON": "* * * * *",
    }
    serve_log = tmp / "serve.log"
    with prefect_server(tmp, extra) as server:
        with open(serve_log, "wb") as out:
            serve = subprocess.Popen([sys.executable, str(REPO / "deployments" / "serve.py")], env=server.env,
                                     cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:  # serve stops first, while the server is up: it pauses its schedules through the server
            started = time.monotonic()
            with temporary_settings({PREFECT_API_URL: server.url, PREFECT_LOCAL_STORAGE_PATH: str(tmp / "results")}):
                from prefect.client.orchestration import get_client
                from prefect.exceptions import ObjectNotFound

                with get_client(sync_client=True) as client:
                    deadline = time.monotonic() + 90
                    for name in ("curate-partition/partition", "nightly/nightly", "backfill/backfill"):
                        while True:
                            try:
                                client.read_deployment_by_name(name)
                                break
                            except ObjectNotFound:
                                if serve.poll() is not None or time.monotonic() > deadline:
                                    pytest.fail(f"serve.py did not register {name}:\n{tail(serve_log)}")
                                time.sleep(0.5)
                try:
                    yield Stack(tmp=tmp, url=server.url, env=server.env, nightly_settings=nightly,
                                serve_log=serve_log, started=started)
                finally:
                    _drain_in_process_workers()  # while the server is up: logs of in-process runs
        finally:
            stop_group(serve, grace=10)


# ------------------------------------------------------------------------------- helpers


def _drain_in_process_workers() -> None:
    """Send this process's buffered run logs and events now, not at exit when the server is gone."""
    from quadflow.log import drain_prefect_workers

    drain_prefect_workers()


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _launch(name: str, parameters: dict[str, Any]):
    from prefect.deployments import run_deployment

    return run_deployment(name, parameters=parameters, timeout=0, as_subflow=False)


def _wait(stack: Stack, run_ids: list[UUID], timeout: float = RUN_TIMEOUT) -> list:
    deadline = time.monotonic() + timeout
    with _client() as client:
        while True:
            runs = [client.read_flow_run(i) for i in run_ids]
            if all(r.state and r.state.is_final() for r in runs):
                return runs
            if time.monotonic() > deadline:
                states = ", ".join(f"{r.name}: {r.state.name if r.state else None}" for r in runs)
                pytest.fail(f"runs not finished after {timeout:.0f}s ({states}); serve log:\n{tail(stack.serve_log)}")
            time.sleep(1)


def _children(parent: UUID, flow_name: str | None = None) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with _client() as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
        if flow_name is None:
            return runs
        flows = {f.id: f.name for f in client.read_flows()}
    return [r for r in runs if flows.get(r.flow_id) == flow_name]


def _log_lines(run_id: UUID) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with _client() as client:
        return [log.message for log in client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]


def _result(run) -> Any:
    assert run.state.is_completed(), f"{run.name}: {run.state.name}: {run.state.message}"
    return run.state.result()


def _check_published(outcome: dict[str, Any]) -> None:
    from quadflow.tasks.export import verify_output

    manifest = verify_output(outcome["output"])
    assert manifest["counts"]["selected_docs"] == outcome["docs"] > 0
    assert manifest["counts"]["selected_tokens"] == outcome["tokens"]
    assert 0.9 * BUDGET <= outcome["tokens"] <= BUDGET


# ------------------------------------------------------------------------------- tests


def test_serve_registers_the_three_deployments_with_schedule_and_defaults(stack):
    with _client() as client:
        nightly = client.read_deployment_by_name("nightly/nightly")
        partition = client.read_deployment_by_name("curate-partition/partition")
        backfill = client.read_deployment_by_name("backfill/backfill")
    assert [s.schedule.cron for s in nightly.schedules] == ["* * * * *"]  # QUADFLOW_NIGHTLY_CRON
    assert partition.schedules == [] and backfill.schedules == []
    for d in (nightly, partition, backfill):
        assert d.parameters["settings"] == Settings.model_validate(stack.nightly_settings).model_dump(mode="json")
    assert backfill.parameters["deployment"] == "partition"


def test_invalid_parameters_are_rejected_before_any_work(stack):
    from prefect.exceptions import PrefectHTTPStatusError

    # A value outside its bounds: the server refuses to create the run at all.
    bad = _settings_dict(stack.tmp, "invalid")
    bad["select"]["budget_tokens"] = -1
    with pytest.raises(PrefectHTTPStatusError) as err:
        _launch("backfill/backfill", {"settings": bad, "start": "2026-11-19", "end": "2026-11-21"})
    assert "settings.select.budget_tokens" in str(err.value) and "minimum of 0" in str(err.value)

    # The same from the command line.
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "deployment", "run", "backfill/backfill",
         "--param", "start=2026-11-19", "--param", "end=2026-11-21", "--param", "max_parallel=0"],
        env=stack.env, cwd=stack.tmp, capture_output=True, text=True, timeout=120)
    assert cli.returncode != 0
    assert "Validation failed for field 'max_parallel'" in " ".join((cli.stdout + cli.stderr).split())

    # Inconsistent settings (checked by the model, not the schema) and a reversed range: the run
    # fails at once with a readable message, before any task or partition run starts.
    no_target = _settings_dict(stack.tmp, "invalid")
    no_target["ingest"]["targets"] = []
    no_target["score"]["scorers"] = ["dsir"]
    r1 = _launch("curate-partition/partition", {"settings": no_target, "partition": "2026-11-19"})
    r2 = _launch("backfill/backfill", {"settings": _settings_dict(stack.tmp, "invalid"),
                                       "start": "2026-11-21", "end": "2026-11-19"})
    r3 = _launch("backfill/backfill", {"settings": _settings_dict(stack.tmp, "invalid"),
                                       "start": "2026-11-19", "end": "2026-11-21", "deployment": "nope"})
    run1, run2, run3 = _wait(stack, [r1.id, r2.id, r3.id])
    assert run1.state.is_failed() and "score.scorers = ['dsir'] need a target set" in run1.state.message
    assert run2.state.is_failed() and "backfill start 2026-11-21 is after end 2026-11-19" in run2.state.message
    assert run3.state.is_failed() and "deployment 'curate-partition/nope' does not exist" in run3.state.message
    assert _children(run3.id) == []
    with _client() as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run1.id])))
    assert tasks == [] and _children(run2.id) == []
    assert not (stack.tmp / "invalid").exists()


def test_two_runs_over_one_store_queue_on_its_lock(stack):
    params = {"settings": _settings_dict(stack.tmp, "concurrent"), "partition": D20.isoformat(), "force": True}
    a, b = _launch("curate-partition/partition", params), _launch("curate-partition/partition", params)
    runs = _wait(stack, [a.id, b.id])
    outcomes = [_result(r) for r in runs]
    assert [o["status"] for o in outcomes] == ["done", "done"]
    assert outcomes[0]["docs"] == outcomes[1]["docs"] and outcomes[0]["tokens"] == outcomes[1]["tokens"]
    _check_published(outcomes[0])

    # The lock serialized them: their curate subflows never overlapped, and one run waited,
    # naming the run that held the lock.
    curates = sorted((c for r in runs for c in _children(r.id, "curate")), key=lambda c: c.start_time)
    assert len(curates) == 2 and all(c.state.is_completed() for c in curates)
    assert curates[0].end_time <= curates[1].start_time
    waits = [m for r in runs for m in _log_lines(r.id) if m.startswith("waiting for store lock")]
    lock = stack.tmp / "concurrent" / "work" / "partitions" / "date=2026-11-20.duckdb.lock"
    assert waits and all(f"waiting for store lock {lock} held by flow run partition-2026-11-20-" in m for m in waits)
    assert lock.exists()


@pytest.fixture(scope="module")
def nightly_run(stack):
    """The first nightly run the scheduler created (cron every minute), once it has finished."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter

    with _client() as client:
        dep = client.read_deployment_by_name("nightly/nightly")
        deadline = stack.started + 200
        while True:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            # the earliest: on a busy machine the next minute's run (which finds the partition done and
            # skips it) can finish before the first has reported its end
            first = min(runs, key=lambda r: r.expected_start_time, default=None)
            if first is not None and first.state and first.state.is_final():
                break
            if time.monotonic() > deadline:
                pytest.fail(f"no scheduled nightly run finished; runs: {[(r.name, r.state.name) for r in runs]}\n"
                            f"{tail(stack.serve_log)}")
            time.sleep(2)
        client.pause_deployment(dep.id)  # one is enough; later ticks would only skip
    return first


def test_scheduled_nightly_run_curates_the_newest_partition(stack, nightly_run):
    assert nightly_run.auto_scheduled
    assert nightly_run.name.startswith("nightly-2026-11-21-quad-30000tok-")
    out = _result(nightly_run)
    assert out["partition"] == "2026-11-21" and out["status"] == "done"
    assert out["output"] == str(stack.tmp / "nightly" / "output" / "date=2026-11-21")
    _check_published(out)
    store = stack.tmp / "nightly" / "work" / "partitions" / "date=2026-11-21.duckdb"
    assert store.exists()
    assert [c.name for c in _children(nightly_run.id)] == [out["flow_run"]]


def test_backfill_runs_due_partitions_and_skips_done_ones(stack, nightly_run):
    run = _launch("backfill/backfill", {"settings": stack.nightly_settings,
                                        "start": "2026-11-19", "end": "2026-11-21"})
    (run,) = _wait(stack, [run.id], timeout=2 * RUN_TIMEOUT)
    assert run.name.startswith("backfill-2026-11-19..2026-11-21-quad-30000tok-")
    outcomes = _result(run)
    assert [(o["partition"], o["status"]) for o in outcomes] == [
        ("2026-11-19", "done"), ("2026-11-20", "done"), ("2026-11-21", "skipped")]
    children = _children(run.id, "curate-partition")
    assert sorted(c.name for c in children) == sorted(o["flow_run"] for o in outcomes[:2])
    assert all(c.name.startswith(f"partition-{c.parameters['partition']}-quad-") for c in children)
    assert outcomes[2]["flow_run"] is None  # no run launched for a done partition
    for o in outcomes:
        _check_published(o)
    assert outcomes[2]["output"] == _result(nightly_run)["output"]

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with _client() as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["quadflow-backfill"])))
    (artifact,) = [a for a in artifacts if a.flow_run_id == run.id]
    assert artifact.type == "table"
    table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert [(r["partition"], r["status"], r["docs"]) for r in table] == [
        (o["partition"], o["status"], o["docs"]) for o in outcomes]
    assert "2 done, 1 skipped, 0 failed" in artifact.description


def test_forced_backfill_reruns_every_partition(stack, nightly_run):
    before = {d: (stack.tmp / "nightly" / "output" / f"date={d}" / "manifest.json").read_bytes()
              for d in ("2026-11-19", "2026-11-20", "2026-11-21")}
    run = _launch("backfill/backfill", {"settings": stack.nightly_settings, "start": "2026-11-19",
                                        "end": "2026-11-21", "force": True})
    (run,) = _wait(stack, [run.id], timeout=2 * RUN_TIMEOUT)
    assert run.name.endswith("-force")
    outcomes = _result(run)
    assert [(o["partition"], o["status"], o["detail"]) for o in outcomes] == [
        (d, "done", "forced") for d in before]
    assert len(_children(run.id, "curate-partition")) == 3
    for o in outcomes:
        _check_published(o)
        # Same settings and inputs: curate's cached tasks give the same, untouched output.
        assert Path(o["manifest"]).read_bytes() == before[o["partition"]]


def test_a_run_that_cannot_get_the_store_lock_fails_naming_the_holder(stack):
    from quadflow.flows.partitions import curate_locked, curate_partition
    from quadflow.locking import store_lock
    from quadflow.partitions import lock_path, partition_settings

    settings = Settings.model_validate(_settings_dict(stack.tmp, "held"))
    ps = partition_settings(settings, D19)
    with store_lock(lock_path(ps), owner="flow run nightly-by-hand (test)"):
        partition_state = curate_partition(settings=settings, partition=D19, lock_timeout=0.5, return_state=True)
        locked_state = curate_locked(settings=ps, lock_timeout=0, return_state=True)
    for state in (partition_state, locked_state):
        assert state.is_failed()
        assert f"gave up waiting for store lock {lock_path(ps)}" in state.message
        assert "held by flow run nightly-by-hand (test)" in state.message
    assert not Path(ps.export.output).exists() and not Path(ps.store).exists()  # no work started
