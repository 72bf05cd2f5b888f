"""Object-store pipelines: s3:// in and out against moto on loopback, incremental ingestion over new
objects, injected faults, a publish killed before its manifest, permission errors, and no credential
anywhere. The curate flow runs for real against a temporary Prefect server; nothing mocks boto3.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from urllib.parse import quote

import duckdb
import polars as pl
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from quadflow import objectstore as ob
from quadflow.cli import main
from quadflow.settings import IngestSettings, build_settings
from quadflow.store import open_store
from quadflow.tasks.export import OutputError, verify_output
from quadflow.tasks.ingest import (
    FileFingerprint,
    InputError,
    ObjectRead,
    choose_base,
    date_filter,
    expand_inputs,
    fingerprint_files,
    ingest,
    object_fingerprint,
    partition_date,
    plan_increment,
    read_object,
)
from tests.conftest import SAMPLE_POOL, SAMPLE_TARGET, task_run_states
from tests.s3util import TEST_ACCESS_KEY, TEST_SECRET_KEY, FaultProxy, apply_test_env, loopback_settings

pytestmark = pytest.mark.e2e

BUDGET = 30_000
SEED = 3
OLD, NEW = "date=2026-11-20", "date=2026-11-21"
# The shipped sample split into four objects of four formats; the last arrives a day later.
FIRST = (f"{OLD}/part-000.jsonl", f"{OLD}/part-001.jsonl.gz", f"{OLD}/part-002.parquet")
LATE = f"{NEW}/part-003.jsonl.zst"
BAD_LINES = b'{"id": "cut", "text": "unterminated\n[1, 2, 3]\n'  # lines 1-2 of the first object
STAGES = ("ingest", "featurize", "cluster", "score", "select", "export", "report")


def _unzstd(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()


def _parts() -> dict[str, bytes]:
    """The sample pool split into four encoded parts, keyed by their path under the pool prefix."""
    lines = _unzstd(SAMPLE_POOL.read_bytes()).splitlines(keepends=True)
    q = len(lines) // 4
    chunks = [b"".join(lines[i * q:(i + 1) * q if i < 3 else None]) for i in range(4)]
    table = io.BytesIO()
    pl.read_ndjson(io.BytesIO(chunks[2])).write_parquet(table)
    return {FIRST[0]: BAD_LINES + chunks[0], FIRST[1]: gzip.compress(chunks[1], mtime=0), FIRST[2]: table.getvalue(),
            LATE: zstandard.ZstdCompressor().compress(chunks[3])}


@dataclass
class World:
    """One bucket, one local copy of the same data, and what the module's runs left behind."""

    endpoint: str
    bucket: str
    admin: object  # boto3 S3 client for setup and checks
    tmp: Path
    parts: dict[str, bytes]
    flow_runs: list = field(default_factory=list)  # ids of every flow run, for the log/artifact grep
    texts: list = field(default_factory=list)  # CLI output and log records, for the grep

    @property
    def pool_url(self) -> str:
        return f"s3://{self.bucket}/raw/"

    def put(self, key: str, data: bytes) -> None:
        self.admin.put_object(Bucket=self.bucket, Key=key, Body=data)

    def settings(self, store: str, output: str, inputs=None, endpoint=None, **ingest):
        store_settings = loopback_settings(endpoint or self.endpoint).model_dump(mode="json")
        return build_settings(overrides={
            "store": str(self.tmp / store), "seed": SEED,
            "ingest": {"inputs": inputs or [self.pool_url], "targets": [f"s3://{self.bucket}/target/"], **ingest},
            "score": {"scorers": ["heuristic", "dsir"]},
            "select": {"selector": "quad", "budget_tokens": BUDGET},
            "export": {"output": output},
            "objectstore": store_settings,
        })

    def run(self, settings, expect_ok: bool = True):
        """Run curate; return (state, {stage: state name}, result or exception)."""
        from quadflow.flows.curate import curate

        state = curate(settings=settings, return_state=True)
        run_id = state.state_details.flow_run_id
        self.flow_runs.append(run_id)
        states = task_run_states(run_id, STAGES if state.is_completed() else ())
        if expect_ok:
            assert state.is_completed(), state
        return state, states, state.result(raise_on_failure=False)

    def read(self, url: str) -> bytes:
        bucket, key = ob.parse(url)
        return self.admin.get_object(Bucket=bucket, Key=key)["Body"].read()

    def manifest(self, prefix: str) -> dict:
        return json.loads(self.read(f"s3://{self.bucket}/{prefix}manifest.json"))

    def selected_ids(self, prefix: str) -> list[str]:
        return pl.read_parquet(io.BytesIO(self.read(f"s3://{self.bucket}/{prefix}selection.parquet")))["id"].to_list()


class _Records(logging.Handler):
    def __init__(self, sink: list):
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(self.format(record))


@pytest.fixture(scope="module")
def world(prefect_server, s3_server, tmp_path_factory):
    import boto3
    from botocore.config import Config

    tmp = tmp_path_factory.mktemp("s3-pipeline")
    with pytest.MonkeyPatch.context() as mp:
        apply_test_env(mp, tmp_path_factory.mktemp("aws-config"))
        admin = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                             config=Config(s3={"addressing_style": "path"}))
        bucket = f"qf-pipe-{uuid.uuid4().hex[:12]}"
        admin.create_bucket(Bucket=bucket)
        w = World(endpoint=s3_server, bucket=bucket, admin=admin, tmp=tmp, parts=_parts())
        handler = _Records(w.texts)
        logging.getLogger().addHandler(handler)
        try:
            w.put("target/target.jsonl.zst", SAMPLE_TARGET.read_bytes())
            for name in FIRST:
                w.put(f"raw/{name}", w.parts[name])
            yield w
        finally:
            logging.getLogger().removeHandler(handler)
            for page in admin.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for obj in page.get("Contents", []):
                    admin.delete_object(Bucket=bucket, Key=obj["Key"])
            for up in admin.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
                admin.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
            admin.delete_bucket(Bucket=bucket)


@pytest.fixture(scope="module")
def local_run(world):
    """A local run over the same four parts (all of them) in the same layout: the reference selection."""
    root = world.tmp / "local" / "raw"
    for name, data in world.parts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    settings = world.settings("local.duckdb", str(world.tmp / "local-out"), inputs=[str(root)])
    settings = settings.model_copy(update={"ingest": settings.ingest.model_copy(
        update={"targets": [str(SAMPLE_TARGET)]})})
    world.run(settings)
    return pl.read_parquet(world.tmp / "local-out" / "selection.parquet")["id"].to_list()


@pytest.fixture(scope="module")
def s3_runs(world):
    """First s3 -> s3 run over the first day's objects, then a second after the late object arrived."""
    first = world.settings("s3.duckdb", f"s3://{world.bucket}/out/")
    _, first_states, first_result = world.run(first)
    first_manifest = world.manifest("out/")
    world.put(f"raw/{LATE}", world.parts[LATE])
    _, second_states, second_result = world.run(first)
    return {"settings": first, "first": first_result, "first_states": first_states, "first_manifest": first_manifest,
            "second": second_result, "second_states": second_states, "second_manifest": world.manifest("out/")}


def _query(store: str | Path, sql: str, params=None) -> list[tuple]:
    with duckdb.connect(str(store), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


# --------------------------------------------------------------------------------------------
# s3 -> s3, identical to local, incremental
# --------------------------------------------------------------------------------------------


def test_s3_to_s3_run_publishes_a_verified_output(world, s3_runs):
    for stage in STAGES:
        assert s3_runs["first_states"][stage] == "Completed", s3_runs["first_states"]
    url = f"s3://{world.bucket}/out/"
    result, manifest = s3_runs["first"], s3_runs["first_manifest"]
    assert result["selection"] == url + "selection.parquet" and result["manifest"] == url + "manifest.json"
    assert manifest["objectstore"]["endpoint_url"] == world.endpoint
    assert manifest["inputs"]["pool"][0]["path"] == f"{world.pool_url}{FIRST[0]}"
    assert {r["path"] for r in manifest["inputs"]["pool"]} == {world.pool_url + n for n in FIRST}
    assert all(r["etag"] for r in manifest["inputs"]["pool"])
    # the report goes up beside the selection; the local copy holds exactly the published bytes
    assert result["report"] == url + "report/report.md"
    assert b"# quadflow report" in world.read(url + "report/report.md")
    assert world.read(url + "report/summary.json").startswith(b"{")
    store_path = Path(s3_runs["settings"].store)
    local = store_path.parent / f"{store_path.stem}.exports" / world.bucket / "out"
    assert (local / "selection.parquet").read_bytes() == world.read(url + "selection.parquet")
    assert (local / "manifest.json").read_bytes() == world.read(url + "manifest.json")
    assert (local / "report" / "report.md").read_bytes() == world.read(url + "report/report.md")
    # every record names the object it came from; objects are hashed while read
    store = s3_runs["settings"].store
    rows = _query(store, "select file, sha256, records from ingest_files where key = ? and role = 'pool' "
                         "order by file", [manifest["stage_keys"]["ingest"]])
    assert [r[0] for r in rows] == [world.pool_url + n for n in FIRST]
    assert rows[1][1] == hashlib.sha256(world.parts[FIRST[1]]).hexdigest()
    q = len(world.parts[FIRST[0]].splitlines()) - 2  # sample records per part; the first adds two bad lines
    assert sum(r[2] for r in rows) == 3 * q + 2
    bad = _query(store, "select file, line, reason from ingest_quarantine where key = ? order by line",
                 [manifest["stage_keys"]["ingest"]])
    assert bad == [(world.pool_url + FIRST[0], 1, "malformed_json"), (world.pool_url + FIRST[0], 2, "not_an_object")]
    assert manifest["counts"]["quarantined"] == {"malformed_json": 1, "not_an_object": 1}


def test_verify_reads_back_an_s3_output_and_catches_a_tampered_object(world, s3_runs, capsys):
    url = f"s3://{world.bucket}/out/"
    store = loopback_settings(world.endpoint)
    assert verify_output(url, store)["export_key"] == s3_runs["second_manifest"]["export_key"]
    assert main(["verify", url, "--endpoint-url", world.endpoint]) == 0
    world.texts.append(capsys.readouterr().out)
    good = world.read(url + "selection.parquet")
    world.put("out/selection.parquet", good[:-1] + bytes([good[-1] ^ 1]))  # same size, other bytes
    try:
        with pytest.raises(OutputError, match="sha256"):
            verify_output(url, store)
    finally:
        world.put("out/selection.parquet", good)


def test_incremental_run_reads_only_the_new_object_and_matches_a_local_run(world, s3_runs, local_run):
    states = s3_runs["second_states"]
    assert states["ingest"] == "Completed" and states["export"] == "Completed", states
    first_key = s3_runs["first_manifest"]["stage_keys"]["ingest"]
    info = s3_runs["second_manifest"]["ingest"]
    # 3 pool objects and the target reused; only the late object read
    assert (info["base_key"], info["reused"], info["read"], info["added"]) == (first_key, 4, 1, 1)
    assert (info["changed"], info["removed"], info["reread"]) == (0, 0, 0)
    assert info["objects_read"] == 1 and info["bytes_read"] == len(world.parts[LATE])
    key = s3_runs["second_manifest"]["stage_keys"]["ingest"]
    store = s3_runs["settings"].store
    assert [(info["docs_reused"],)] == _query(store, "select count(*) from ingest_docs where key = ?", [first_key])
    read_in = dict(_query(store, "select file, read_in from ingest_objects where key = ? and role = 'pool'", [key]))
    assert read_in == {**{world.pool_url + n: first_key for n in FIRST}, world.pool_url + LATE: key}
    (late_records,) = _query(store, "select records from ingest_files where key = ? and file = ?",
                             [key, world.pool_url + LATE])[0]
    assert late_records == len(_unzstd(world.parts[LATE]).splitlines())
    n, lo, hi = _query(store, "select count(*), min(doc_idx), max(doc_idx) from ingest_docs "
                              "where key = ? and role = 'pool'", [key])[0]
    assert (lo, hi) == (0, n - 1) and n == s3_runs["second"]["summary"]["pool_docs"]
    # appending in key order reproduces a from-scratch ingest: the same selection as a local run
    assert world.selected_ids("out/") == local_run


def test_unchanged_rerun_reads_and_rewrites_nothing(world, s3_runs):
    url = f"s3://{world.bucket}/out/"
    before = world.admin.head_object(Bucket=world.bucket, Key="out/manifest.json")["LastModified"]
    _, states, result = world.run(s3_runs["settings"])
    assert all(states[s] == "Cached" for s in STAGES), states
    assert result["manifest"] == url + "manifest.json"
    assert world.admin.head_object(Bucket=world.bucket, Key="out/manifest.json")["LastModified"] == before


def test_since_selects_only_the_new_partition_without_reading_it_again(world, s3_runs):
    settings = s3_runs["settings"]
    since = settings.model_copy(update={
        "ingest": settings.ingest.model_copy(update={"since": date(2026, 11, 21)}),
        "export": settings.export.model_copy(update={"output": f"s3://{world.bucket}/out-new/"}),
    })
    world.run(since)
    manifest = world.manifest("out-new/")
    assert [r["path"] for r in manifest["inputs"]["pool"]] == [world.pool_url + LATE]
    info = manifest["ingest"]
    assert (info["reused"], info["read"], info["removed"], info["objects_read"]) == (2, 0, 3, 0)
    sel = pl.read_parquet(io.BytesIO(world.read(f"s3://{world.bucket}/out-new/selection.parquet")))
    assert set(sel["file"]) == {world.pool_url + LATE}


def test_an_endpoint_given_by_aws_endpoint_url_is_recorded_in_the_manifest(world, s3_runs, monkeypatch):
    # No objectstore.endpoint_url: boto3 takes the endpoint from AWS_ENDPOINT_URL; the manifest used to say none.
    monkeypatch.setenv("AWS_ENDPOINT_URL", world.endpoint)
    settings = s3_runs["settings"]
    out = world.tmp / "env-endpoint-out"
    world.run(settings.model_copy(update={
        "objectstore": settings.objectstore.model_copy(update={"endpoint_url": None}),
        "export": settings.export.model_copy(update={"output": str(out)}),
    }))
    manifest = verify_output(out)
    assert manifest["settings"]["objectstore"]["endpoint_url"] is None
    assert manifest["objectstore"]["endpoint_url"] == world.endpoint


# --------------------------------------------------------------------------------------------
# Faults, a publish killed half-way, errors
# --------------------------------------------------------------------------------------------


def test_run_through_faults_gives_the_same_selection_and_reports_retries(world, local_run):
    host, port = world.endpoint.removeprefix("http://").rsplit(":", 1)
    proxy = FaultProxy((host, int(port)), fault_rate=0.3, seed=5, stall_s=1.5).start()
    try:
        settings = world.settings("fault.duckdb", f"s3://{world.bucket}/out-fault/", endpoint=proxy.endpoint)
        store = settings.objectstore.model_copy(update={"read_timeout": 1.0, "connect_timeout": 1.0})
        world.run(settings.model_copy(update={"objectstore": store}))
    finally:
        proxy.stop()
    faults = sum(n for outcome, n in proxy.counts.items() if outcome != "ok")
    assert faults > 0, proxy.counts
    manifest = world.manifest("out-fault/")
    retries = manifest["objectstore"]["read"]["retries"] + manifest["objectstore"]["write"]["retries"]
    assert retries > 0, (manifest["objectstore"], proxy.counts)
    assert manifest["objectstore"]["endpoint_url"] == proxy.endpoint
    assert world.selected_ids("out-fault/") == local_run


def test_shard_parts_on_the_object_store_give_the_same_selection_without_a_shared_directory(world, local_run):
    """run.parts = s3://...: worker processes get their inputs and fitted state from the bucket and put their
    outputs there; the run selects what the run on local parts selected and leaves the prefix empty."""
    host, port = world.endpoint.removeprefix("http://").rsplit(":", 1)
    proxy = FaultProxy((host, int(port)), fault_rate=0.0).start()  # no faults: it logs every request
    try:
        settings = world.settings("s3parts.duckdb", str(world.tmp / "s3parts-out"),
                                  inputs=[str(world.tmp / "local" / "raw")], endpoint=proxy.endpoint)
        settings = settings.model_copy(update={
            "ingest": settings.ingest.model_copy(update={"targets": [str(SAMPLE_TARGET)]}),
            "run": settings.run.model_copy(update={"parts": f"s3://{world.bucket}/shard-parts", "shard_docs": 1_000,
                                                   "runner": "processes", "workers": 2})})
        world.run(settings)
    finally:
        proxy.stop()
    assert pl.read_parquet(world.tmp / "s3parts-out" / "selection.parquet")["id"].to_list() == local_run
    puts = set()  # (stage, kind of object) of every object written under the parts prefix
    for r in proxy.log:
        if r.method == "PUT" and "/shard-parts/" in r.path and r.outcome == "ok":
            stage_dir, name = r.path.split("?")[0].split("/shard-parts/", 1)[1].split("/", 1)
            puts.add((stage_dir.split("-", 1)[0], name.split("-", 1)[0] if name.endswith(".parquet") else name))
    assert puts == {("ingest", "out"), ("ingest", "bad"), ("ingest", "ids"), ("texts", "in"), ("dedup", "out"),
                    ("dedup", "pairs"),
                    ("featurize", "out"), ("featurize", "lsa.npz"), ("cluster", "in"), ("cluster", "centers.pkl"),
                    ("cluster", "model.pkl"), ("cluster", "out"), ("score", "out"), ("score", "scorers.pkl")}, puts
    assert world.admin.list_objects_v2(Bucket=world.bucket, Prefix="shard-parts/").get("KeyCount") == 0  # cleaned
    assert not Path(f"{settings.store}.parts").exists()  # nothing went through a local directory
    sharded = "role <> 'base'"  # ingest's base row is the flow's own (the copy of an incremental run's base)
    counts = dict(_query(settings.store, f"select stage, count(*) from shard_done where {sharded} "
                                         "and source = 'computed' group by stage"))
    assert counts["ingest"] == 4 + 1 and all(counts[s] >= 4 for s in ("dedup", "featurize", "cluster", "score")), counts
    pids = {w.rsplit(":", 1)[-1] for (w,) in _query(settings.store, f"select distinct worker from shard_done "
                                                                    f"where {sharded}")}
    assert str(os.getpid()) not in pids  # every shard ran in a worker process, reading its parts from the bucket


def test_publish_killed_before_the_manifest_leaves_nothing_complete_and_rerun_publishes(
        world, s3_runs, monkeypatch, capsys):
    prefix = "out-killed/"
    url = f"s3://{world.bucket}/{prefix}"
    settings = s3_runs["settings"].model_copy(update={
        "export": s3_runs["settings"].export.model_copy(update={"output": url})})
    real_upload = ob.upload_file

    def upload_then_die(c, local_path, dest):
        if dest.endswith("/manifest.json"):
            raise RuntimeError("process killed before the manifest went up")
        return real_upload(c, local_path, dest)

    monkeypatch.setattr(ob, "upload_file", upload_then_die)
    state, states, _ = world.run(settings, expect_ok=False)
    monkeypatch.undo()
    assert state.is_failed() and states["export"] == "Failed", states
    keys = {o["Key"] for o in world.admin.list_objects_v2(Bucket=world.bucket, Prefix=prefix).get("Contents", [])}
    assert keys == {prefix + "selection.parquet"}  # data went up, nothing says it is complete
    with pytest.raises(OutputError, match="does not exist"):
        verify_output(url, settings.objectstore)
    assert main(["verify", url, "--endpoint-url", world.endpoint]) == 1
    world.texts.extend(capsys.readouterr())
    # a multipart upload a killed process left behind is aborted by the next publish
    world.admin.create_multipart_upload(Bucket=world.bucket, Key=prefix + "selection.parquet")

    _, states, result = world.run(settings)
    assert states["export"] == "Completed" and states["select"] == "Cached", states
    manifest = verify_output(url, settings.objectstore)
    assert manifest["outputs"] == s3_runs["second_manifest"]["outputs"]  # byte-identical selection
    assert world.admin.list_multipart_uploads(Bucket=world.bucket, Prefix=prefix).get("Uploads", []) == []
    assert result["manifest"] == url + "manifest.json"


def test_missing_buckets_fail_fast_naming_the_bucket(world, capsys):
    missing = "qf-no-such-bucket-7f3a"
    base = ["run", "--endpoint-url", world.endpoint, "--store", str(world.tmp / "never.duckdb"),
            "--target", str(SAMPLE_TARGET), "--budget-tokens", "1000"]
    assert main([*base, "--input", f"s3://{missing}/raw/", "--output", str(world.tmp / "never")]) == 2
    err = capsys.readouterr().err
    assert f"bucket {missing!r} does not exist" in err and world.endpoint in err and "Traceback" not in err
    assert main([*base, "--input", world.pool_url, "--output", f"s3://{missing}/out/"]) == 2
    err2 = capsys.readouterr().err
    assert f"bucket {missing!r} does not exist" in err2
    assert main([*base, "--input", f"s3://{world.bucket}/raw/date=2026-12-*/"]) == 2
    assert "matches no object" in capsys.readouterr().err
    world.texts.extend([err, err2])
    assert not (world.tmp / "never.duckdb").exists()  # failed before anything ran


def test_access_denied_names_the_bucket_before_and_during_a_run(world, s3_admin, s3_bucket, moto_auth,
                                                                 monkeypatch, capsys):
    # moto_auth: a user who may list s3_bucket and nothing else (s3_bucket already holds one object)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_auth["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_auth["secret_key"])
    base = ["run", "--endpoint-url", world.endpoint, "--target", str(SAMPLE_TARGET), "--budget-tokens", "1000",
            "--scorer", "heuristic", "--store", str(world.tmp / "denied.duckdb"),
            "--output", str(world.tmp / "denied-out")]
    assert main([*base, "--input", world.pool_url]) == 2  # may not even list it
    err = capsys.readouterr().err
    assert "access denied" in err and repr(world.bucket) in err and "Traceback" not in err
    assert main([*base, "--input", f"s3://{s3_bucket}/"]) == 2  # lists it, may not read the object
    err2 = capsys.readouterr().err
    assert "access denied: read" in err2 and f"s3://{s3_bucket}/seed.jsonl" in err2
    for text in (err, err2):
        assert moto_auth["secret_key"] not in text and moto_auth["access_key"] not in text
    world.texts.extend([err, err2])


@pytest.fixture
def s3_bucket(s3_bucket, s3_admin):
    """The shared fixture's fresh bucket, with one object written before moto_auth locks it."""
    s3_admin.put_object(Bucket=s3_bucket, Key="seed.jsonl", Body=b'{"text": "one document"}\n')
    return s3_bucket


def test_no_credential_in_any_log_artifact_report_or_output(world):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId,
    )

    assert len(world.flow_runs) >= 6
    secrets = {TEST_ACCESS_KEY, TEST_SECRET_KEY, quote(TEST_SECRET_KEY, safe=""), quote(TEST_SECRET_KEY, safe="/")}
    haystack: list[tuple[str, str]] = [("log record", t) for t in world.texts]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=world.flow_runs)))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=world.flow_runs)))
        params = [client.read_flow_run(r).parameters for r in world.flow_runs]
    assert logs and artifacts
    haystack += [("prefect log", lg.message) for lg in logs]
    haystack += [("artifact", json.dumps(a.data, default=str)) for a in artifacts]
    haystack += [("flow parameters", json.dumps(p, default=str)) for p in params]
    for page in world.admin.get_paginator("list_objects_v2").paginate(Bucket=world.bucket):
        for obj in page.get("Contents", []):
            if not obj["Key"].startswith(("raw/", "target/")):
                haystack.append((obj["Key"], world.read(f"s3://{world.bucket}/{obj['Key']}").decode("latin-1")))
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    for root in (world.tmp, Path(PREFECT_LOCAL_STORAGE_PATH.value())):  # stores, copies, reports, results
        for path in root.rglob("*"):
            if path.is_file():
                haystack.append((str(path), path.read_bytes().decode("latin-1")))
    assert any("manifest.json" in where for where, _ in haystack)
    leaks = [where for where, text in haystack if any(s in text for s in secrets)]
    assert leaks == []


# --------------------------------------------------------------------------------------------
# Incremental semantics on local files (no Prefect): the core and the task
# --------------------------------------------------------------------------------------------


def test_object_readers_quarantine_bad_records_and_name_a_broken_object(s3_settings, s3_bucket, s3_admin):
    c = ob.client(s3_settings)
    s3_admin.put_object(Bucket=s3_bucket, Key="raw/ok.jsonl.gz",
                        Body=gzip.compress(b'{"text": "a fine document."}\n{"text": ""}\nnot json\n'))
    s3_admin.put_object(Bucket=s3_bucket, Key="raw/broken.jsonl.gz", Body=b"this is not gzip")
    ok, broken = [object_fingerprint(o) for o in ob.expand(c, f"s3://{s3_bucket}/raw/ok*")
                  + ob.expand(c, f"s3://{s3_bucket}/raw/broken*")]
    stats = ObjectRead()
    batches = list(read_object(c, ok, "pool", stats=stats))
    good = pl.concat([b.good for b in batches])
    bad = pl.concat([b.bad for b in batches])
    assert good.select("file", "line").rows() == [(ok.path, 1)]
    assert bad.select("file", "line", "reason").rows() == [(ok.path, 2, "empty_text"), (ok.path, 3, "malformed_json")]
    assert stats.sha256 == hashlib.sha256(s3_admin.get_object(Bucket=s3_bucket, Key="raw/ok.jsonl.gz")["Body"].read()
                                          ).hexdigest() and stats.bytes == ok.size
    with pytest.raises(InputError, match=f"s3://{s3_bucket}/raw/broken.jsonl.gz.*cannot be read"):
        list(read_object(c, broken, "pool"))
    s3_admin.put_object(Bucket=s3_bucket, Key="raw/ok.jsonl.gz", Body=b"replaced since it was listed\n")
    with pytest.raises(ob.ObjectStoreError, match="changed while it was being read"):
        list(read_object(c, ok, "pool"))


def _fp(path: str, identity: str, size: int = 10) -> FileFingerprint:
    return FileFingerprint(path, size, 0, identity)


def test_choose_base_prefers_an_exact_match_then_the_most_shared_bytes():
    wanted = {"pool": (_fp("a", "1", 100), _fp("b", "2", 10)), "target": ()}
    history = pl.DataFrame({
        "key": ["old", "old", "big", "exact", "exact"],
        "created_at": [1, 1, 2, 0, 0],  # seconds: "exact" is the oldest
        "role": ["pool"] * 5, "file": ["a", "b", "a", "a", "b"],
        "identity": [f"sha256:{i}" for i in ("1", "x", "1", "1", "2")],  # as FileFingerprint.identity spells it
    }).with_columns(pl.from_epoch("created_at", time_unit="s"))
    assert choose_base(wanted, history) == ("exact", True)
    partial = history.filter(pl.col("key") != "exact")
    assert choose_base(wanted, partial) == ("big", False)  # "old" shares as many bytes but is older
    assert choose_base(wanted, partial.filter(pl.col("file") == "b")) == (None, False)  # shares nothing


def test_plan_drops_an_unchanged_input_whose_duplicate_was_kept_in_a_changed_one():
    wanted = {"pool": (_fp("a", "new"), _fp("b", "2"), _fp("c", "3"), _fp("d", "4")), "target": ()}
    base = pl.DataFrame({"role": ["pool"] * 4, "file": ["a", "b", "c", "e"],
                         "identity": [f"sha256:{i}" for i in ("1", "2", "3", "5")]})
    links = pl.DataFrame({"role": ["pool", "pool"], "file": ["b", "c"], "kept_file": ["a", "b"]})
    plan = plan_increment(wanted, "K", base, links)
    # a changed; b duplicated a's copy, c duplicated b's: both read again; e removed; d added
    assert plan.base_key is None and plan.kept == ()
    assert (plan.added, plan.changed, plan.removed, plan.reread) == (1, 1, 1, 2)
    plan = plan_increment(wanted, "K", base, links.head(1).with_columns(file=pl.lit("c"), kept_file=pl.lit("e")))
    assert plan.kept == (("pool", "b"),) and [fp.path for _, fp in plan.read] == ["a", "c", "d"]


def test_date_partitions_select_inputs_by_path_segment():
    paths = ["s3://b/raw/date=2026-11-20/a.jsonl", "s3://b/raw/date=2026-11-21/x/b.jsonl", "/d/c.jsonl"]
    assert partition_date(paths[1]) == date(2026, 11, 21) and partition_date(paths[2]) is None
    assert date_filter(paths, None, None) == paths
    assert date_filter(paths, date(2026, 11, 21), None) == paths[1:2]
    assert date_filter(paths, None, [date(2026, 11, 20)]) == paths[:1]


def test_cli_flags_reach_the_settings(capsys):
    code = main(["run", "--input", "s3://raw/pool/", "--endpoint-url", "http://127.0.0.1:9000", "--since",
                 "2026-11-21", "--partition", "2026-11-22", "--full-ingest", "--show-settings"])
    shown = json.loads(capsys.readouterr().out)
    assert code == 0 and shown["objectstore"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert (shown["ingest"]["since"], shown["ingest"]["partitions"], shown["ingest"]["incremental"]) == (
        "2026-11-21", ["2026-11-22"], False)
    assert main(["run", "--input", "x.jsonl", "--endpoint-url", "http://key:secret@host", "--show-settings"]) == 2
    assert "secret" not in capsys.readouterr().err


def _ingest(root: Path, store, incremental: bool = True):
    settings = IngestSettings(inputs=[str(root)], incremental=incremental)
    files = fingerprint_files(expand_inputs(settings.inputs))
    ref = ingest.fn(settings, files, (), store)
    with duckdb.connect(store.path, read_only=True) as con:
        docs = con.execute("select doc_idx, doc_id, file, line from ingest_docs where key = ? order by doc_idx",
                           [ref.key]).fetchall()
        bad = con.execute("select file, line, reason from ingest_quarantine where key = ?", [ref.key]).fetchall()
        dups = con.execute("select kept_file, kept_line from ingest_duplicates where key = ?", [ref.key]).fetchall()
        run = con.execute("select base_key, reused, read, reread from ingest_runs where key = ?", [ref.key]).fetchone()
    return ref, docs, set(bad), dups, run


_TEXTS = st.sampled_from(["alpha doc.", "beta doc.", "gamma doc.", "delta doc.", "eps doc.", '{"oops'])
# at least one good record: a pool of only bad ones is refused (InputError), whichever way it is ingested
_FILES = st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.lists(_TEXTS, min_size=1, max_size=4),
                         min_size=1).filter(lambda files: any(t != '{"oops' for ts in files.values() for t in ts))


@given(before=_FILES, after=_FILES)
@hsettings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_incremental_ingest_holds_what_a_fresh_ingest_holds(tmp_path_factory, before, after):
    tmp = tmp_path_factory.mktemp("incr")

    def write(files: dict[str, list[str]]) -> None:
        for p in (tmp / "pool").glob("*.jsonl"):
            p.unlink()
        (tmp / "pool").mkdir(exist_ok=True)
        for name, texts in files.items():
            lines = [t if t.startswith("{") else json.dumps({"text": t}) for t in texts]
            (tmp / "pool" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")

    write(before)
    store = open_store(tmp / "incr.duckdb")
    first = _ingest(tmp / "pool", store)[0]
    write(after)
    ref, docs, bad, dups, run = _ingest(tmp / "pool", store)
    _, fresh_docs, fresh_bad, _, _ = _ingest(tmp / "pool", open_store(tmp / "fresh.duckdb"), incremental=False)
    assert sorted(d[1] for d in docs) == sorted(d[1] for d in fresh_docs)  # same documents, each once
    assert [d[0] for d in docs] == list(range(len(docs)))  # doc_idx dense
    assert bad == fresh_bad
    kept_at = {(d[2], d[3]) for d in docs}
    assert all(d in kept_at for d in dups)  # every duplicate points at a kept copy
    assert (ref == first) == (before == after)  # the same inputs reuse the partition as it is


def test_incremental_ingest_resurrects_a_duplicate_whose_kept_copy_changed(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "a.jsonl").write_text('{"text": "alpha doc."}\n{"text": "beta doc."}\n')
    (pool / "b.jsonl").write_text('{"text": "beta doc."}\n{"text": "gamma doc."}\n')
    (pool / "c.jsonl").write_text('{"text": "delta doc."}\n')
    store = open_store(tmp_path / "s.duckdb")
    first, *_ = _ingest(pool, store)
    assert _ingest(pool, store)[0] == first  # unchanged inputs: the same partition, nothing read
    (pool / "a.jsonl").write_text('{"text": "omega doc."}\n')
    ref, docs, _, dups, run = _ingest(pool, store)
    assert ref.key != first.key and run == (first.key, 1, 2, 1)  # c reused; a changed; b read again
    assert [(Path(d[2]).name, d[3]) for d in docs] == [("c.jsonl", 1), ("a.jsonl", 1), ("b.jsonl", 1),
                                                       ("b.jsonl", 2)]
    assert dups == []
