"""Bad input, full and read-only disks, clashing outputs: every one ends in a named error and exit 2, or
is quarantined with a reason, never in a traceback or lost data.

Runs go through the `quadflow` command against the session's Prefect server. Full and read-only disks
are real: a tmpfs mounted in a private mount namespace of the command's own process (`unshare`), so the
kernel refuses the writes; nothing is mocked.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, event, example, given, settings as hsettings, strategies as st

from quadflow.cli import main
from quadflow.settings import ConfigError, IngestSettings
from quadflow.store import connect, open_store
from quadflow.tasks import ingest as ing
from quadflow.tasks.export import verify_output
from tests.conftest import SAMPLE_POOL

QUADFLOW = str(Path(sys.executable).parent / "quadflow")
POOL_DOCS = 400  # records of the shipped sample in the small pool: enough for clusters, quick to curate


def _sample_lines(n: int | None = None) -> list[bytes]:
    data = zstandard.ZstdDecompressor().stream_reader(SAMPLE_POOL.read_bytes(), read_across_frames=True).read()
    return data.splitlines()[:n]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    path.write_bytes(b"\n".join(_sample_lines(POOL_DOCS)) + b"\n")
    return path


@pytest.fixture(scope="module")
def cli_env(prefect_server, tmp_path_factory) -> dict[str, str]:
    """Environment for `quadflow` subprocesses: the session's Prefect server, a fresh Prefect home."""
    from prefect.settings import PREFECT_API_URL

    home = tmp_path_factory.mktemp("prefect-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(home),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOCAL_STORAGE_PATH=str(home / "results"))
    return env


def _run(env, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([QUADFLOW, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _args(pool: Path, tmp: Path, store: str = "s.duckdb", output: str = "out", *extra: str) -> list[str]:
    return ["run", "--input", str(pool), "--store", str(tmp / store), "--output", str(tmp / output),
            "--budget-tokens", "20000", "--scorer", "heuristic", *extra]


# --------------------------------------------------------------------------------------------
# Bad input: quarantined with a reason, or a named error when nothing is left
# --------------------------------------------------------------------------------------------


def test_a_text_field_no_record_has_exits_2_naming_it_without_a_traceback(cli_env, pool, tmp_path):
    proc = _run(cli_env, *_args(pool, tmp_path, "s.duckdb", "out", "--text-field", "body"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (f"quadflow: error: the pool holds no usable document: all {POOL_DOCS} records of '{pool}' were "
            f"quarantined (missing_text={POOL_DOCS}); most records have no text field 'body': set --text-field"
            ) in proc.stderr


def test_an_empty_pool_exits_2_naming_its_inputs(prefect_server, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(_args(empty, tmp_path)) == 2
    assert f"the pool holds no document: its 1 input(s) ('{empty}') hold no record" in capsys.readouterr().err


def test_a_target_set_of_only_bad_records_exits_2_naming_it(prefect_server, pool, tmp_path, capsys):
    target = tmp_path / "target.jsonl"
    target.write_text('{"text": 42}\n{"title": "no text"}\n{"text": "unterminated\n')
    code = main(["run", "--input", str(pool), "--target", str(target), "--store", str(tmp_path / "s.duckdb"),
                 "--output", str(tmp_path / "out"), "--budget-tokens", "20000"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"the target set holds no usable document: all 3 records of '{target}' were quarantined" in err
    assert "without target documents the target scorers have nothing to compare with" in err


def _nested(depth: int) -> bytes:
    return b'{"id": "deep", "text": "A record nested very deep.", "meta": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.fixture(scope="module")
def published(prefect_server, pool, tmp_path_factory):
    """One JSONL run whose pool holds a record hundreds of levels deep (JSONL export used to die on one)."""
    tmp = tmp_path_factory.mktemp("published")
    deep = tmp / "deep.jsonl"
    deep.write_bytes(_nested(600) + b"\n")
    args = ["run", "--input", str(pool), "--input", str(deep), "--store", str(tmp / "a.duckdb"), "--output",
            str(tmp / "out"), "--budget-tokens", "20000", "--scorer", "heuristic", "--format", "jsonl"]
    assert main(args) == 0
    return tmp


def test_a_deeply_nested_record_is_quarantined_and_the_jsonl_export_succeeds(published):
    manifest = verify_output(published / "out")
    assert manifest["counts"]["quarantined"] == {"too_deep": 1}
    rows = [json.loads(line) for line in (published / "out" / "selection.jsonl").read_text().splitlines()]
    assert rows and all(r.get("source_id") != "deep" for r in rows)


def test_a_second_store_publishing_to_the_same_output_exits_2_and_loses_nothing(published, pool, capsys):
    before = (published / "out" / "manifest.json").read_bytes()
    code = main(["run", "--input", str(pool), "--store", str(published / "b.duckdb"), "--output",
                 str(published / "out"), "--budget-tokens", "20000", "--scorer", "heuristic"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"holds the selection that store {published / 'a.duckdb'} published" in err and "--overwrite" in err
    assert (published / "out" / "manifest.json").read_bytes() == before
    assert not (published / "b.duckdb").exists()  # refused before the run started


def test_an_output_directory_of_other_files_exits_2_before_the_run(pool, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 not ours")
    assert main(_args(pool, tmp_path, "s.duckdb", "photos")) == 2
    assert "is a non-empty directory quadflow did not create (it holds holiday.jpg)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"] and not (tmp_path / "s.duckdb").exists()


def test_an_output_inside_the_input_directory_exits_2(pool, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(pool, data / "pool.jsonl")
    code = main(["run", "--input", str(data), "--store", str(tmp_path / "s.duckdb"), "--output",
                 str(data / "curated"), "--budget-tokens", "20000"])
    assert code == 2
    assert f"lies inside the --input '{data}': the next run would ingest its own selection" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Full and read-only disks, for real
# --------------------------------------------------------------------------------------------


def _unshare() -> list[str]:
    return ["unshare", "--mount", "--propagation", "private"] if os.geteuid() == 0 else \
        ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]


@pytest.fixture(scope="module")
def private_mounts():
    """Runs a shell script in its own mount namespace, where it may mount a small tmpfs (a disk it can fill)."""
    probe = subprocess.run([*_unshare(), "sh", "-c", "mount -t tmpfs -o size=64k none /mnt && echo ok"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "ok":
        pytest.skip(f"needs a private mount namespace to mount a small tmpfs (unshare): {probe.stderr.strip()}")

    def run(script: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*_unshare(), "sh", "-c", script], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)

    return run


def test_a_full_disk_under_the_store_exits_2_naming_the_store(private_mounts, cli_env, pool, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    args = " ".join(_args(pool, tmp_path, "disk/s.duckdb", "out"))
    proc = private_mounts(f"mount -t tmpfs -o size=768k quadflow-test {disk} && exec {QUADFLOW} {args}",
                          cli_env, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("quadflow: error: ") and "No space left on device" in last, last
    assert str(disk) in last  # names where


def test_a_read_only_or_full_output_exits_2_before_the_run(private_mounts, cli_env, pool, tmp_path):
    ro, full = tmp_path / "ro", tmp_path / "full"
    ro.mkdir()
    full.mkdir()
    script = (f"mount -t tmpfs -o ro,size=1m quadflow-test {ro} && mount -t tmpfs -o size=256k quadflow-test {full}"
              f" && (cat /dev/zero > {full}/filler 2>/dev/null; true)"
              f" && {QUADFLOW} {' '.join(_args(pool, tmp_path, 'a.duckdb', 'ro/out'))}; echo \"rc=$?\" >&2"
              f"; {QUADFLOW} {' '.join(_args(pool, tmp_path, 'b.duckdb', 'full/out'))}; echo \"rc=$?\" >&2")
    proc = private_mounts(script, cli_env, tmp_path)
    err = proc.stderr
    assert "Traceback" not in err, err[-3000:]
    assert err.count("rc=2") == 2, err[-3000:]
    assert f"export.output = '{ro}/out' cannot be written: {ro} is on a read-only file system" in err
    assert f"export.output = '{full}/out' cannot be written: the file system holding {full} is full" in err
    assert "Beginning flow run" not in err  # checked before the run, not retried as transient for 35 s
    assert not (tmp_path / "a.duckdb").exists() and not (tmp_path / "b.duckdb").exists()


def test_a_republish_that_runs_out_of_space_keeps_the_previous_output(private_mounts, cli_env, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # 400k tokens of the sample: ~0.9 MB as Parquet with its report, ~2.4 MB as JSONL; 2.5 MB hold the first
    # with over 1 MiB to spare (the pre-run check passes) but not the second written beside it
    base = ["run", "--input", str(SAMPLE_POOL), "--store", str(tmp_path / "s.duckdb"), "--output", str(out),
            "--budget-tokens", "400000", "--scorer", "heuristic"]
    script = (f"mount -t tmpfs -o size=2560k quadflow-test {out}"
              f" && {QUADFLOW} {' '.join(base)} >/dev/null 2>&1 || exit 10"
              f"; {QUADFLOW} {' '.join(base)} --format jsonl; echo \"rc=$?\" >&2"
              f"; {QUADFLOW} verify {out}; ls -a {out} >&2")
    proc = private_mounts(script, cli_env, tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "rc=2" in err and "Traceback" not in err, err[-3000:]
    assert "quadflow: error: no space to write" in err and "No space left on device" in err, err[-2000:]
    assert f"verified {out}: selection.parquet" in proc.stdout  # the previous output is whole
    listing = err.split("rc=2", 1)[1]
    assert "selection.jsonl" not in listing and ".publish-" not in listing  # nothing half-written left


# --------------------------------------------------------------------------------------------
# Leftovers of a failed write
# --------------------------------------------------------------------------------------------


def test_a_failed_lsa_save_leaves_no_partial_file(tmp_path):
    from quadflow.tasks.featurize import LSA, hashed_ngrams

    texts = [f"document {i} about topic {i % 7} with words {i * 3} and {i * 5}" for i in range(300)]
    lsa = LSA(dim=16, sample=300, random_state=0).fit(hashed_ngrams(texts, 4096, 1000))  # ~0.5 MB of state
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # the kernel refuses to grow a file past 64 KiB
    try:
        with pytest.raises(OSError) as e:
            lsa.save(tmp_path / "lsa.npz")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert e.value.errno == errno.EFBIG
    assert list(tmp_path.iterdir()) == []  # the partial .tmp-*-lsa.npz is gone
    lsa.save(tmp_path / "lsa.npz")
    assert np.allclose(LSA.load(tmp_path / "lsa.npz").components_, lsa.components_)


# --------------------------------------------------------------------------------------------
# Fuzz: whatever the bytes, every record is a document or quarantined with a reason; the run ends 0 or 2
# --------------------------------------------------------------------------------------------

_text = st.one_of(st.text(max_size=40), st.sampled_from(["", "   ", "\ud800", "a\udc80b", "\ufeffBOM", "x" * 300]))
_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _text)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                     max_leaves=12)
_record = st.one_of(
    st.binary(max_size=120),  # anything at all, newlines included
    _json.map(lambda v: json.dumps(v).encode()),  # any JSON value, objects or not
    st.fixed_dictionaries({"text": st.one_of(_text, _json)}, optional={"id": _json, "source": _json, "meta": _json})
    .map(lambda d: json.dumps(d).encode()),  # records with every kind of text field
    st.fixed_dictionaries({"text": _text}).map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "replace")),
    st.integers(100, 1100).map(_nested),  # nesting around the depth limit and past the parser's
    st.builds(lambda b, cut: b[:cut], st.sampled_from(_sample_lines(20)), st.integers(0, 400)),  # cut records
)
_pool_bytes = st.lists(_record, max_size=25).map(lambda lines: b"\n".join(lines) + b"\n")


def _expected_records(data: bytes) -> int:
    """Records a JSONL reader must account for: non-blank lines (a UTF-8 BOM before the first is not content)."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    return sum(1 for ln in lines if ln and not ln.isspace())


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=_pool_bytes, compression=st.sampled_from(["", ".gz", ".zst"]))
def test_fuzzed_input_is_ingested_or_quarantined_with_a_reason(tmp_path_factory, data, compression):
    tmp = tmp_path_factory.mktemp("fuzz")
    path = tmp / f"pool.jsonl{compression}"
    path.write_bytes(gzip.compress(data) if compression == ".gz" else
                     zstandard.ZstdCompressor().compress(data) if compression == ".zst" else data)
    settings = IngestSettings(inputs=[str(path)], max_doc_chars=200)
    store = open_store(tmp / "s.duckdb")
    try:
        ref = ing.ingest.fn(settings, ing.resolve_files(settings.inputs), (), store)
    except ConfigError as e:  # nothing usable: a named error (the CLI's exit 2), never anything else
        assert "the pool holds no" in str(e)
        key = None
    else:
        key = ref.key
    with connect(store, read_only=True) as con:
        key = key or con.execute("select key from ingest_files limit 1").fetchone()[0]
        (records, ingested, quarantined, duplicates), = con.execute(
            "select records, ingested, quarantined, duplicates from ingest_files where key = ?", [key]).fetchall()
        reasons = con.execute("select reason, detail from ingest_quarantine where key = ?", [key]).fetchall()
        docs = con.execute("select text, n_tokens from ingest_docs where key = ?", [key]).fetchall()
    assert records == _expected_records(data) == ingested + quarantined + duplicates
    assert (len(docs), len(reasons)) == (ingested, quarantined)
    assert all(reason in ing.REASONS and detail for reason, detail in reasons), reasons
    assert all(text.strip() and len(text) <= 200 for text, _ in docs)
    for text, _ in docs:
        text.encode("utf-8")  # kept text is valid Unicode (no lone surrogates)


@hsettings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=_pool_bytes, good=st.integers(0, 4))
@example(data=b"\x00\xff\n[]\n", good=0)  # nothing usable: exit 2
@example(data=_nested(900) + b"\n" + b"\xef\xbb\xbf{}\n", good=3)  # a few documents among bad records: exit 0
def test_fuzzed_pools_end_a_run_with_0_or_2(prefect_server, tmp_path_factory, data, good):
    tmp = tmp_path_factory.mktemp("fuzz-run")
    (tmp / "pool.jsonl").write_bytes(b"".join(line + b"\n" for line in _sample_lines(good)) + data)
    # main() returns the exit status; any exception other than a named error escapes it and fails the test
    code = main(["run", "--input", str(tmp / "pool.jsonl"), "--store", str(tmp / "s.duckdb"), "--output",
                 str(tmp / "out"), "--budget-tokens", "500", "--scorer", "heuristic"])
    event(f"exit {code}")
    assert code in (0, 2)
    if code == 0:
        assert verify_output(tmp / "out")["counts"]["selected_docs"] > 0
    if good:
        assert code == 0
