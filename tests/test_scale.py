"""Scale: SIGKILL a run at any point and rerun it (same selection, no shard done twice), and the Dask runner.

Every run here is `quadflow run` in its own process group against one real `prefect server start`
on loopback. The pool (12,000 documents, 2 files) comes from benchmarks/make_scale_pool.py over the
shipped sample; shards of 1,500 documents give 8 featurize and 8 score shards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import duckdb
import polars as pl
import pytest
import yaml

from benchmarks.prefect_server import free_port, prefect_server, stop_group, tail
from tests.conftest import REPO, SAMPLE_TARGET

POOL_DOCS = 12_000
SHARD_DOCS = 1_500
QUADFLOW = str(Path(sys.executable).parent / "quadflow")


def _make_pool(path: Path, docs: int, per_file: int, seed: int) -> Path:
    """A scale pool built from the shipped sample by benchmarks/make_scale_pool.py."""
    from benchmarks import make_scale_pool as msp

    msp.make_scale_pool(REPO / "examples" / "data" / "pool.jsonl.zst", path,
                        msp.ScaleSpec(docs=docs, docs_per_file=per_file, seed=seed), log=lambda *_: None)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    pool = _make_pool(tmp / "pool", POOL_DOCS, POOL_DOCS // 2, seed=1)
    extra = {"PREFECT_LOCAL_STORAGE_PATH": str(tmp / "results"), "PYTHONPATH": str(REPO)}
    with prefect_server(tmp, extra) as server:
        yield {"tmp": tmp, "pool": pool, "env": server.env}


def _config(env, name: str) -> Path:
    tmp = env["tmp"]
    settings = {
        "store": str(tmp / name / "quadflow.duckdb"),
        "seed": 2,
        "ingest": {"inputs": [str(env["pool"])], "targets": [str(SAMPLE_TARGET)], "batch_rows": 2_000},
        "score": {"scorers": ["heuristic", "dsir", "classifier"]},
        "select": {"selector": "quad", "budget_tokens": 200_000},
        "export": {"output": str(tmp / name / "out")},
        "run": {"shard_docs": SHARD_DOCS, "workers": 2},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _start(env, config: Path, *extra: str, log: Path) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen([QUADFLOW, "run", "--config", str(config), *extra], env=env["env"], cwd=env["tmp"],
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc, grace=5)
        pytest.fail(f"quadflow run did not finish in {timeout}s:\n{tail(log)}")
    assert rc == 0, tail(log)


def _selected(name: str, env) -> list[str]:
    return pl.read_parquet(env["tmp"] / name / "out" / "selection.parquet")["id"].sort().to_list()


def _kill_when(proc: subprocess.Popen, parts: Path, stage: str, n: int, log: Path, timeout: float = 300) -> None:
    """SIGKILL the whole run (flow, Prefect workers) once `n` output parts of `stage` exist: mid-stage.

    Output parts wait under `parts` until the stage completes, or (featurize) move into the store's data
    directory as each shard is recorded; both count."""
    deadline = time.monotonic() + timeout
    data = parts.with_name(parts.name.removesuffix(".parts") + ".data")
    while len(list(parts.glob(f"{stage}-*/out-*.parquet"))) + len(list(data.glob(f"{stage}/key=*/role=*/*.parquet"))) < n:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {n} {stage} shards were done:\n{tail(log)}")
        if time.monotonic() > deadline:
            stop_group(proc, grace=1)
            pytest.fail(f"no {n} {stage} parts after {timeout}s:\n{tail(log)}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def baseline(env):
    """One uninterrupted run on the default runner (local processes)."""
    log = env["tmp"] / "baseline.log"
    _finish(_start(env, _config(env, "baseline"), log=log), log)
    return _selected("baseline", env)


def test_a_run_logs_its_flow_process_cpu_and_peak_memory_by_stage(env, baseline):
    """The coordinator's own cost, per stage, in the last lines of a run (what benchmarks/scale.py reads)."""
    text = (env["tmp"] / "baseline.log").read_text(errors="replace")
    stages = ["resolve", "ingest", "dedup", "featurize", "cluster", "semdedup", "score", "select", "export", "report"]
    cpu = re.search(r"flow process CPU: ([\d.]+) s in all; by stage: (.*)", text)
    assert cpu and [m.group(1) for m in re.finditer(r"(\w+) [\d.]+ s", cpu.group(2))] == stages, text[-3000:]
    rss = re.search(r"flow process peak RSS: ([\d,]+) MB; the high-water mark once each stage is done: (.*)", text)
    assert rss, text[-3000:]
    marks = [(m.group(1), int(m.group(2).replace(",", ""))) for m in re.finditer(r"(\w+) ([\d,]+) MB", rss.group(2))]
    peaks = [mb for _, mb in marks]
    assert [name for name, _ in marks] == stages
    # a high-water mark: it never falls, the run's is at least the last stage's, and a process holding a flow
    # (Prefect, polars, DuckDB) is over 100 MB
    assert peaks == sorted(peaks) and peaks[-1] <= int(rss.group(1).replace(",", "")) and peaks[0] > 100


def test_sigkill_anywhere_then_rerun_gives_the_same_selection_without_redoing_shards(env, baseline):
    config, tmp = _config(env, "killed"), env["tmp"]
    parts = tmp / "killed" / "quadflow.duckdb.parts"
    logs = [tmp / f"killed-{i}.log" for i in range(3)]
    _kill_when(_start(env, config, log=logs[0]), parts, "featurize", 3, logs[0])  # during featurize
    _kill_when(_start(env, config, log=logs[1]), parts, "score", 2, logs[1])  # during score
    _finish(_start(env, config, log=logs[2]), logs[2])

    assert _selected("killed", env) == baseline
    assert "featurize: resuming:" in logs[1].read_text(errors="replace")
    last = logs[2].read_text(errors="replace")
    assert "score: resuming:" in last
    done = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in SUMMARY.finditer(last)}
    assert "featurize" not in done  # finished by the second run: cached, not run again
    assert 0 < done["score"][1] < done["score"][0]  # only the score shards the kill left are computed

    with duckdb.connect(str(tmp / "killed" / "quadflow.duckdb"), read_only=True) as con:
        dup = con.execute("select count(*) from (select stage, key, role, lo, count(*) n from shard_done "
                          "group by all having n > 1)").fetchone()[0]
        per_stage = dict(con.execute("select stage, sum(hi - lo) from shard_done where role = 'pool' "
                                     "and stage in ('featurize', 'score') group by stage").fetchall())
        pool = con.execute("select count(*) from ingest_docs where role = 'pool'").fetchone()[0]
        rows = con.execute("select count(*), count(distinct doc_idx) from featurize_vectors where role = 'pool'"
                           ).fetchone()
    assert dup == 0 and per_stage == {"featurize": pool, "score": pool}
    assert rows == (pool, pool)  # no document featurized twice
    # a killed run cannot report its end (it stayed RUNNING); the run after it marks it Crashed
    assert _states_of_runs_over(env, tmp / "killed" / "quadflow.duckdb") == ["CRASHED", "CRASHED", "COMPLETED"]
    for log in logs[1:]:
        assert "marked 1 flow run(s) a killed process left running as Crashed" in log.read_text(errors="replace")


def _states_of_runs_over(env, store: Path) -> list[str]:
    """State types of the curate flow runs over `store` on the test's Prefect server, oldest first."""
    req = urllib.request.Request(f"{env['env']['PREFECT_API_URL']}/flow_runs/filter", method="POST",
                                 data=json.dumps({"sort": "START_TIME_ASC", "limit": 200}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        runs = json.loads(resp.read())
    return [r["state_type"] for r in runs
            if r["name"].startswith("curate-") and r["parameters"].get("settings", {}).get("store") == str(store)]


# "<stage>: <total> shards: <computed> computed (...)" -- the last run's work per stage
SUMMARY = re.compile(r"(featurize|score): (\d+) shards: (\d+) computed")


def test_dask_cluster_of_separate_processes_gives_the_same_selection(env, baseline):
    dask = Path(sys.executable).parent / "dask"
    assert dask.exists(), "dask is not installed: make test installs '.[dask]'"
    port = free_port()
    procs, logs = [], []
    try:
        for i, cmd in enumerate([[str(dask), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard"]] +
                                [[str(dask), "worker", f"tcp://127.0.0.1:{port}", "--nworkers", "1", "--nthreads",
                                  "1", "--no-dashboard", "--name", f"w{i}"] for i in range(2)]):
            logs.append(env["tmp"] / f"dask-{i}.log")
            with open(logs[-1], "wb") as out:
                procs.append(subprocess.Popen(cmd, env=env["env"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            if i == 0:
                time.sleep(3)
        deadline = time.monotonic() + 90
        while sum("Starting established connection" in p.read_text(errors="replace") for p in logs[1:]) < 2:
            if time.monotonic() > deadline:
                pytest.fail("dask workers did not connect:\n" + "\n".join(tail(p) for p in logs))
            time.sleep(0.5)
        config, log = _config(env, "dask"), env["tmp"] / "dask.log"
        run = _start(env, config, "--runner", f"dask://127.0.0.1:{port}", log=log)
        _finish(run, log)
    finally:
        for proc in reversed(procs):
            stop_group(proc, grace=5)
    assert _selected("dask", env) == baseline
    with duckdb.connect(str(env["tmp"] / "dask" / "quadflow.duckdb"), read_only=True) as con:
        workers = {w for (w,) in con.execute("select distinct worker from shard_done where source = 'computed' "
                                              "and stage in ('featurize', 'score')").fetchall()}
    assert len(workers) >= 2, workers  # shards ran in more than one worker process ...
    assert not any(w.endswith(f":{run.pid}") for w in workers), workers  # ... none of them the flow's


def test_ray_cluster_of_separate_processes_gives_the_same_selection(env, baseline):
    """A Ray head started with `ray start` (its own GCS, raylet and worker processes); the run joins it as a
    driver through RAY_ADDRESS, as a flow run on a cluster's head node (or submitted as a Ray job) does."""
    ray = Path(sys.executable).parent / "ray"
    assert ray.exists(), "ray is not installed: make test installs '.[ray]'"
    gcs = free_port()
    temp = Path(tempfile.mkdtemp(prefix="qf-ray-", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    # RAY_AUTH_MODE explicit for head and driver alike: unset, `ray start` turns token authentication on when
    # ~/.ray/auth_token exists (any earlier local Ray instance writes one) and the driver then fails to connect
    ray_env = {**env["env"], "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    base = [str(ray), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
            "--num-cpus", "2", "--include-dashboard", "false",
            "--temp-dir", str(temp), "--disable-usage-stats"]
    log = env["tmp"] / "ray-start.log"
    try:
        with open(log, "wb") as out:
            started = subprocess.run(base, env=ray_env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=180)
        assert started.returncode == 0, tail(log)
        config, log = _config(env, "ray"), env["tmp"] / "ray.log"
        run = _start({**env, "env": {**ray_env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}}, config, "--runner", "ray",
                     log=log)
        _finish(run, log)
    finally:
        # `ray stop` stops every Ray process of this user on the machine: the test suite runs no other Ray
        subprocess.run([str(ray), "stop", "--force"], env=ray_env, cwd=REPO, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
    assert _selected("ray", env) == baseline
    with duckdb.connect(str(env["tmp"] / "ray" / "quadflow.duckdb"), read_only=True) as con:
        workers = {w for (w,) in con.execute("select distinct worker from shard_done where source = 'computed' "
                                              "and stage in ('featurize', 'score')").fetchall()}
    assert len(workers) >= 2, workers  # shards ran in more than one Ray worker process ...
    assert not any(w.endswith(f":{run.pid}") for w in workers), workers  # ... none of them the flow's


def test_peak_memory_is_set_by_the_shard_not_the_pool(tmp_path):
    """Each shard stage's peak RSS, in a fresh process, barely moves when the pool grows 12x.

    Shards of 2,500 documents, a 1,000-vector k-means sample, DuckDB capped at 128 MB: a 240,000-document
    pool (about 230 MB more text than the 20,000-document one) may cost each stage at most 90% of that
    extra text. A stage that held the pool's texts, as whole-pool code does, would cost more than all of it.
    The pool is that large because DuckDB may fill its 128 MB on the big pool (score's pool-wide ranks did:
    84-135 MB more on 160,000 documents, at the bound of an 8x pool on a busy machine).
    """
    pool = _make_pool(tmp_path / "pool", 240_000, 20_000, seed=3)
    files = sorted(str(p) for p in pool.glob("part-*.jsonl.zst"))
    env = {**os.environ, "QUADFLOW_DUCKDB_MEMORY": "128MB", "PYTHONPATH": str(REPO)}
    configs, text = {}, {}
    for n_files in (1, 12):
        work = tmp_path / f"w{n_files}"
        config = tmp_path / f"w{n_files}.yaml"
        config.write_text(yaml.safe_dump({
            "store": str(work / "q.duckdb"), "seed": 0,
            "ingest": {"inputs": files[:n_files], "targets": [str(SAMPLE_TARGET)], "batch_rows": 5_000},
            "featurize": {"svd_sample": 2_000},
            "cluster": {"k": 40, "fit_sample": 1_000},
            "score": {"scorers": ["heuristic", "dsir", "classifier"]},
            "select": {"budget_tokens": 50_000},
            "export": {"output": str(work / "out")},
            "run": {"shard_docs": 2_500},
        }))
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stages.py"), "--config", str(config)],
                              cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        configs[n_files] = config
        with duckdb.connect(str(work / "q.duckdb"), read_only=True) as con:
            text[n_files] = con.execute("select sum(strlen(text)) / 2^20 from ingest_docs where role = 'pool'"
                                        ).fetchone()[0]
    extra_text = text[12] - text[1]
    assert extra_text > 200, text  # the big pool really is bigger

    def peak(n_files: int, stage: str) -> float:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.stage_rss", "--config", str(configs[n_files]),
                               "--stage", stage], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]

    for stage in ("featurize", "cluster", "score"):
        peaks = {n: [peak(n, stage)] for n in (1, 12)}
        if peaks[12][0] - peaks[1][0] >= 0.9 * extra_text:
            # a busy machine's allocator can add a spike to one process: the lower of two fresh ones decides
            peaks = {n: runs + [peak(n, stage)] for n, runs in peaks.items()}
        assert min(peaks[12]) - min(peaks[1]) < 0.9 * extra_text, (stage, peaks, text)
