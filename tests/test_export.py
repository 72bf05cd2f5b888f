import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl
import pytest

import quadflow.tasks.export as ex
from quadflow.settings import build_settings
from quadflow.store import StageRef, open_store
from quadflow.tasks.export import OutputError, export, jsonl_record, pivot_scores, verify_output
from tests.test_score_task import TOTALS_FROM_NGRAMS

# Upstream tables as ARCHITECTURE.md documents them (written here by hand; other stages own them).
UPSTREAM_DDL = """
create table ingest_docs (key varchar, role varchar, doc_idx bigint, doc_id varchar, source_id varchar,
    text varchar, n_tokens bigint, n_chars bigint, source varchar, file varchar, line bigint, fields varchar);
create table ingest_quarantine (key varchar, role varchar, file varchar, line bigint, reason varchar,
    detail varchar, excerpt varchar);
create table ingest_duplicates (key varchar, role varchar, doc_id varchar, file varchar, line bigint,
    kept_file varchar, kept_line bigint);
create table featurize_ngrams (key varchar, role varchar, doc_idx bigint, buckets usmallint[], counts usmallint[]);
create table cluster_assignments (key varchar, doc_idx bigint, cluster integer, distance double);
create table cluster_info (key varchar, k integer, gamma double, inertia double);
create table score_docs (key varchar, doc_idx bigint, scorer varchar, version varchar, score double, detail varchar);
create table select_rounds (key varchar, round integer, cluster integer, ucb double, mean_probe double,
    reward double, accepted boolean, block_start bigint, block_docs bigint, tokens_accepted bigint);
create table select_probes (key varchar, round integer, cluster integer, doc_idx bigint, score double);
create table select_selection (key varchar, doc_idx bigint, rank bigint, cluster integer, round integer,
    reason varchar);
create table select_info (key varchar, name varchar, value varchar);
"""

N_POOL, K = 20, 4
SELECTED = [7, 2, 15, 0, 11, 4]  # doc_idx in rank order
SOURCES = ["manual", "dict", "dict", "fortune"]


@dataclass(frozen=True)
class Fingerprint:
    path: str
    size: int
    mtime_ns: int
    sha256: str


def _tokens(i: int) -> int:
    return 10 + i


def build_store(tmp_path: Path, selector: str = "quad") -> dict:
    """A store holding one partition of every upstream table, with known content."""
    store = open_store(tmp_path / "store.duckdb")
    con = duckdb.connect(store.path)
    con.execute(UPSTREAM_DDL)
    for i in range(N_POOL):
        fields = {"lang": "en", "title": f"doc {i}", "source": "collides"} if i % 2 == 0 else {}
        con.execute(
            "insert into ingest_docs values ('D', 'pool', ?, ?, ?, ?, ?, ?, ?, 'pool.jsonl', ?, ?)",
            [i, f"d{i:02d}", f"src-{i}", f"text of document {i}", _tokens(i), 20 + i,
             SOURCES[i % 4], i + 1, json.dumps(fields) if fields else None],
        )
        con.execute("insert into cluster_assignments values ('C', ?, ?, 0.1)", [i, i % K])
        detail = "short_doc,no_punct" if i % 5 == 0 else ("short_doc" if i % 3 == 0 else "")
        con.execute("insert into score_docs values ('S', ?, 'heuristic', 'h-1', ?, ?)", [i, 1.0 - i / 40, detail])
        con.execute("insert into score_docs values ('S', ?, 'dsir', 'd-1', ?, '')", [i, i / 10])
        con.execute("insert into score_docs values ('S', ?, 'combined', 'c-1', ?, '')", [i, i / 20])
        # pool documents use buckets 0..3; even ones lean to bucket 0 like the target does
        con.execute("insert into featurize_ngrams values ('F', 'pool', ?, [0, 1, 2, 3], ?)",
                    [i, [5, 1, 1, 1] if i % 2 == 0 else [1, 1, 1, 5]])
    for i in range(3):
        con.execute("insert into ingest_docs values ('D', 'target', ?, ?, null, 'target text', 5, 11, "
                    "'ref', 'target.jsonl', ?, null)", [i, f"t{i}", i + 1])
        con.execute("insert into featurize_ngrams values ('F', 'target', ?, [0, 1], [6, 1])", [i])
    con.execute(TOTALS_FROM_NGRAMS)  # what the featurize stage writes beside its n-grams
    con.executemany("insert into ingest_quarantine values ('D', 'pool', 'pool.jsonl', ?, ?, '', '')",
                    [[30, "malformed_json"], [31, "malformed_json"], [32, "empty_text"]])
    con.execute("insert into ingest_duplicates values ('D', 'pool', 'd03', 'pool.jsonl', 40, 'pool.jsonl', 4)")
    con.execute("insert into cluster_info values ('C', ?, 0.3, 1.5)", [K])
    reason = "quad_block" if selector == "quad" else selector
    for rank, i in enumerate(SELECTED):
        rnd = (1 if rank < 3 else 2) if selector == "quad" else None
        con.execute("insert into select_selection values ('Q', ?, ?, ?, ?, ?)",
                    [i, rank, i % K, rnd, reason if rank < 5 or selector != "quad" else "quad_fill"])
    if selector == "quad":
        con.executemany("insert into select_rounds values ('Q', ?, ?, 0.5, ?, ?, ?, 0, 3, ?)", [
            [1, 3, 0.6, 0.1, True, 40], [1, 2, 0.4, -0.1, False, 0], [2, 0, 0.7, 0.2, True, 35],
        ])
        con.executemany("insert into select_probes values ('Q', ?, ?, ?, 0.5)",
                        [[0, 1, 1], [1, 3, 7], [1, 3, 11], [1, 2, 2], [2, 0, 0]])
    for name, value in [("selector", selector), ("tau", "0.5"), ("alpha", "0.01"), ("block_docs", "3")]:
        con.execute("insert into select_info values ('Q', ?, ?)", [name, value])
    con.close()

    def ref(stage, key):
        return StageRef(stage=stage, key=key, store=store, rows=1, fingerprint=f"1:{key}")

    settings = build_settings(overrides={
        "store": store.path,
        "ingest": {"inputs": [str(tmp_path / "pool.jsonl")], "targets": [str(tmp_path / "target.jsonl")]},
        "score": {"scorers": ["heuristic", "dsir"]},
        "select": {"selector": selector, "budget_tokens": 200},
        "export": {"output": str(tmp_path / "out")},
    })
    return {
        "settings": settings, "store": store,
        "files": (Fingerprint(str(tmp_path / "pool.jsonl"), 123, 1, "a" * 64),),
        "targets": (Fingerprint(str(tmp_path / "target.jsonl"), 45, 2, "b" * 64),),
        "docs": ref("ingest", "D"), "features": ref("featurize", "F"), "clusters": ref("cluster", "C"),
        "scores": ref("score", "S"), "selection": ref("select", "Q"),
    }


def run_export(w: dict, settings=None):
    return export.fn(settings or w["settings"], w["files"], w["targets"], w["docs"], w["clusters"],
                     w["scores"], w["selection"], w["features"])


@pytest.fixture
def world(tmp_path):
    return build_store(tmp_path)


def _mtimes(d: Path) -> dict[str, int]:
    """Modification times of the published files (the marker is the publish lock: taking it writes its owner)."""
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir() if p.name != ex.MARKER}


def test_parquet_export_has_selection_in_rank_order_with_scores_and_manifest(world):
    res = run_export(world)
    out = Path(res.output)
    sel = pl.read_parquet(res.selection_path)
    assert sel.columns == ["id", "source_id", "text", "source", "file", "line", "fields", "n_tokens", "cluster",
                           "score_dsir", "score_heuristic", "score_combined", "heuristic_failed", "rank",
                           "round", "reason"]
    assert sel["id"].to_list() == [f"d{i:02d}" for i in SELECTED]
    assert sel["rank"].to_list() == list(range(len(SELECTED)))
    assert sel["score_dsir"].to_list() == pytest.approx([i / 10 for i in SELECTED])
    assert sel["heuristic_failed"].to_list()[:3] == ["", "", "short_doc,no_punct"]
    assert sel["cluster"].to_list() == [i % K for i in SELECTED]
    assert json.loads(sel["fields"][1]) == {"lang": "en", "title": "doc 2", "source": "collides"}
    assert sel["reason"].to_list()[-1] == "quad_fill"

    manifest = verify_output(out)
    tokens = sum(_tokens(i) for i in SELECTED)
    assert (res.docs, res.tokens) == (len(SELECTED), tokens)
    c = manifest["counts"]
    assert c["pool_docs"] == N_POOL and c["target_docs"] == 3 and c["duplicates"] == 1
    assert c["quarantined"] == {"malformed_json": 2, "empty_text": 1} and c["quarantined_total"] == 3
    assert c["selected_tokens"] == tokens and c["fill_fraction"] == pytest.approx(tokens / 200)
    assert manifest["selection_key"] == "Q" and manifest["stage_keys"]["featurize"] == "F"
    assert manifest["inputs"]["pool"][0]["sha256"] == "a" * 64
    assert manifest["store"]["store_id"] == world["store"].store_id
    assert manifest["settings"]["select"]["budget_tokens"] == 200
    assert {"prefect", "duckdb", "polars", "numpy", "scikit-learn", "pyarrow", "python"} <= set(manifest["packages"])
    assert manifest["outputs"][0]["path"] == "selection.parquet" and manifest["outputs"][0]["rows"] == 6
    assert res.manifest_sha256 == ex.hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()

    with duckdb.connect(world["store"].path) as con:
        rows = con.execute("select key, output, manifest_sha256, docs, tokens from export_runs").fetchall()
    assert rows == [(res.key, str(out), res.manifest_sha256, 6, tokens)]


def test_jsonl_export_merges_carried_fields(world):
    s = world["settings"]
    res = run_export(world, s.model_copy(update={"export": s.export.model_copy(update={"format": "jsonl"})}))
    lines = Path(res.selection_path).read_text().splitlines()
    recs = [json.loads(ln) for ln in lines]
    assert Path(res.selection_path).name == "selection.jsonl"
    assert [r["id"] for r in recs] == [f"d{i:02d}" for i in SELECTED]
    assert recs[1]["lang"] == "en" and recs[1]["title"] == "doc 2"
    assert recs[1]["source"] == "dict" and recs[1]["input_source"] == "collides"  # name clash kept, prefixed
    assert "fields" not in recs[0] and recs[0]["score_combined"] == pytest.approx(0.35)
    assert verify_output(res.output)["outputs"][0]["rows"] == len(SELECTED)


def test_a_republish_that_fails_before_its_manifest_leaves_the_previous_output_verifiable(world, monkeypatch):
    first = run_export(world)
    out = Path(first.output)
    before = verify_output(out)
    s = world["settings"]
    jsonl = s.model_copy(update={"export": s.export.model_copy(update={"format": "jsonl"})})

    def crash(path, manifest):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ex, "write_manifest", crash)
    with pytest.raises(OSError, match="No space left"):
        run_export(world, jsonl)
    # written aside, swapped last: the failure came before the old manifest was touched (it used to go first)
    assert verify_output(out) == before
    assert sorted(p.name for p in out.iterdir()) == [ex.MARKER, "manifest.json", "selection.parquet"]

    monkeypatch.undo()
    res = run_export(world, jsonl)
    manifest = verify_output(out)
    assert manifest["outputs"][0]["path"] == "selection.jsonl"
    assert sorted(p.name for p in out.iterdir()) == [ex.MARKER, "manifest.json", "selection.jsonl"]  # parquet gone
    assert res.docs == len(SELECTED)


def test_reexport_of_same_selection_rewrites_nothing(world):
    first = run_export(world)
    out = Path(first.output)
    before = _mtimes(out)
    second = run_export(world)
    assert second == first
    assert _mtimes(out) == before


def test_tampered_output_fails_verification_and_is_republished(world):
    res = run_export(world)
    path = Path(res.selection_path)
    path.write_bytes(path.read_bytes()[:-1] + b"X")
    with pytest.raises(OutputError, match="sha256"):
        verify_output(res.output)
    run_export(world)
    verify_output(res.output)


def test_cache_key_recomputes_only_when_published_output_changed(world):
    params = {name: world[name] for name in ("settings", "files", "targets", "docs", "clusters", "scores",
                                             "selection", "features")}
    before = ex._output_cache_key(None, params)
    res = run_export(world)
    assert ex._output_cache_key(None, params) == before  # an unchanged rerun is a cache hit
    os.remove(res.manifest_path)
    deleted = ex._output_cache_key(None, params)
    assert deleted != before  # a deleted output recomputes
    run_export(world)
    assert ex._output_cache_key(None, params) == before


def test_pivot_scores_and_jsonl_record():
    long = pl.DataFrame({"doc_idx": [1, 1, 2, 2], "scorer": ["heuristic", "combined", "heuristic", "combined"],
                         "score": [0.5, 0.1, 0.2, float("nan")], "detail": ["a,b", "", "", ""]})
    wide, cols = pivot_scores(long)
    assert cols == ["score_heuristic", "score_combined"]
    assert wide.sort("doc_idx")["heuristic_failed"].to_list() == ["a,b", ""]
    with pytest.raises(ValueError, match="'bad name'"):
        pivot_scores(long.with_columns(scorer=pl.lit("bad name")))
    rec = jsonl_record({"id": "x", "source": "s", "score_combined": float("nan"),
                        "fields": '{"lang": "de", "id": "y", "source": "s"}'})
    assert rec == {"id": "x", "source": "s", "score_combined": None, "lang": "de", "input_id": "y"}


def _with_output(w: dict, output: Path, **export) -> dict:
    s = w["settings"]
    return {**w, "settings": s.model_copy(update={"export": s.export.model_copy(update={"output": str(output),
                                                                                         **export})})}


def test_a_non_empty_directory_quadflow_did_not_create_is_refused_unless_overwrite(world, tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    theirs = {"notes.txt": b"keep me", "manifest.json": b'{"owner": "another tool"}', "selection.parquet": b"PAR1"}
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    w = _with_output(world, out)
    with pytest.raises(ex.ConfigError, match=r"non-empty directory quadflow did not create \(it holds "
                                             r"manifest.json, notes.txt, selection.parquet\).*--overwrite"):
        run_export(w)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == theirs  # nothing touched
    res = run_export(_with_output(world, out, overwrite=True))
    assert verify_output(out)["export_key"] == res.key and (out / "notes.txt").read_bytes() == b"keep me"
    assert (out / ex.MARKER).exists()
    assert run_export(w).key == res.key  # adopted: from now on it is quadflow's directory


def test_an_output_another_store_published_is_refused_unless_overwrite(world, tmp_path):
    first = run_export(world)
    other = _with_output(build_store(tmp_path / "other"), Path(first.output))
    with pytest.raises(ex.ConfigError, match=f"holds the selection that store {world['store'].path} published"):
        run_export(other)
    assert verify_output(first.output)["store"]["path"] == world["store"].path  # the first selection survives
    run_export(_with_output(other, Path(first.output), overwrite=True))
    assert verify_output(first.output)["store"]["path"] == other["store"].path


def test_two_exports_into_one_directory_at_once_publish_once(world, tmp_path, monkeypatch):
    import threading

    first = world
    second = _with_output(build_store(tmp_path / "other"), tmp_path / "out")
    publishing, finish = threading.Event(), threading.Event()
    real_publish = ex._publish

    def slow_publish(con, settings, *args):
        if settings.store == first["settings"].store:  # hold the first publish open until the second has started
            publishing.set()
            assert finish.wait(30)
        return real_publish(con, settings, *args)

    monkeypatch.setattr(ex, "_publish", slow_publish)
    results: dict[str, object] = {}

    def go(name, w):
        try:
            results[name] = run_export(w)
        except Exception as e:  # noqa: BLE001 - the outcome is what the test compares
            results[name] = e

    a = threading.Thread(target=go, args=("first", first))
    a.start()
    assert publishing.wait(30)
    b = threading.Thread(target=go, args=("second", second))
    b.start()
    b.join(timeout=2)
    assert b.is_alive()  # waiting for the output's lock, not publishing alongside
    finish.set()
    a.join(30)
    b.join(30)
    assert isinstance(results["first"], ex.ExportResult), results
    assert isinstance(results["second"], ex.ConfigError) and "holds the selection that store" in str(results["second"])
    assert verify_output(tmp_path / "out")["store"]["path"] == first["store"].path


@pytest.mark.parametrize("inputs, targets, output, culprit", [
    (["{tmp}/data"], [], "{tmp}/data/out", "--input '{tmp}/data'"),
    (["{tmp}/data/**/*.parquet"], [], "{tmp}/data/curated", "--input '{tmp}/data/**/*.parquet'"),
    (["{tmp}/pool.jsonl"], ["{tmp}/refs"], "{tmp}/refs", "--target '{tmp}/refs'"),
    (["s3://b/raw/"], [], "s3://b/raw/curated/", "--input 's3://b/raw/'"),
])
def test_an_output_inside_an_input_is_refused(world, tmp_path, inputs, targets, output, culprit):
    fill = {"tmp": tmp_path}
    s = world["settings"]
    settings = s.model_copy(update={
        "ingest": s.ingest.model_copy(update={"inputs": [i.format(**fill) for i in inputs],
                                              "targets": [t.format(**fill) for t in targets]}),
        "export": s.export.model_copy(update={"output": output.format(**fill)}),
    })
    with pytest.raises(ex.ConfigError, match="the next run would ingest its own selection") as e:
        ex.check_output(settings, world["store"].path)
    assert f"lies inside the {culprit.format(**fill)}" in str(e.value)


def test_an_output_beside_the_inputs_is_fine(world, tmp_path):
    s = world["settings"]
    settings = s.model_copy(update={
        "ingest": s.ingest.model_copy(update={"inputs": [f"{tmp_path}/data/*.jsonl", f"{tmp_path}/raw"]}),
        "export": s.export.model_copy(update={"output": f"{tmp_path}/data/curated"}),
    })
    ex.check_output(settings, world["store"].path)  # *.jsonl does not reach into data/curated/


def test_a_publish_clears_what_a_killed_publish_left_staged(world):
    first = run_export(world)
    out = Path(first.output)
    (out / ".publish-killed").mkdir()
    (out / ".publish-killed" / "selection.jsonl").write_bytes(b"half a selection")
    s = world["settings"]
    run_export(world, s.model_copy(update={"export": s.export.model_copy(update={"format": "jsonl"})}))
    assert sorted(p.name for p in out.iterdir()) == [ex.MARKER, "manifest.json", "selection.jsonl"]
