"""Shards: bounded pieces of featurize, cluster and score, identical results at any shard size, resume after a crash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from quadflow.settings import ClusterSettings, ConfigError, FeaturizeSettings, RunSettings, ScoreSettings
from quadflow.shards import (MAX_HASH_RANGES, Shard, hash_range, hash_ranges, part_rows, plan_shards, text_parts,
                             write_parquet_atomic)
from quadflow.store import StageRef, capped_memory, connect, open_store
from quadflow.tasks import cluster as cluster_mod
from quadflow.tasks import featurize as featurize_mod
from quadflow.tasks import score as score_mod
from quadflow.tasks.cluster import cluster
from quadflow.tasks.featurize import featurize
from quadflow.tasks.ingest import HASH_SPACE, Deduplicator, doc_id, first_copies, sorted_ids
from quadflow.tasks.score import score
from tests.test_score_task import PROSE, _pool

FEAT = FeaturizeSettings(n_features=2048, dsir_buckets=256, dim=8, svd_sample=100, max_chars=400)
SCORE = ScoreSettings(scorers=["heuristic", "dsir", "classifier"])


def test_plan_covers_every_document_once_in_bounded_shards():
    shards = plan_shards({"pool": 10, "target": 3}, 4)
    assert [(s.role, s.lo, s.hi) for s in shards] == [
        ("pool", 0, 4), ("pool", 4, 8), ("pool", 8, 10), ("target", 0, 3)]
    assert plan_shards({"pool": 0, "target": 0}, 4) == []
    with pytest.raises(ValueError, match="shard_docs must be >= 1"):
        plan_shards({"pool": 3}, 0)


def test_a_part_is_whole_or_absent(tmp_path):
    path = tmp_path / "p" / "out.parquet"
    table = pa.table({"x": [1, 2, 3]})
    assert write_parquet_atomic(path, [table, table]) == 6 and part_rows(path) == 6

    def broken():
        yield table
        raise OSError("disk gone")

    other = tmp_path / "p" / "other.parquet"
    with pytest.raises(OSError, match="disk gone"):
        write_parquet_atomic(other, broken())
    assert not other.exists() and sorted(p.name for p in other.parent.iterdir()) == ["out.parquet"]
    path.write_bytes(path.read_bytes()[:20])  # truncated, e.g. by a crash of a non-atomic writer
    assert part_rows(path) is None and part_rows(tmp_path / "missing.parquet") is None


# --------------------------------------------------------------------------- featurize + score


def make_docs(tmp_path, n_pool: int = 45, n_target: int = 6) -> StageRef:
    store = open_store(tmp_path / "store.duckdb")
    pool, target = _pool(n_pool), [PROSE[i % 2] + f" Extra {i}." for i in range(n_target)]
    with duckdb.connect(store.path) as con:
        con.execute("create table ingest_docs (key varchar, role varchar, doc_idx bigint, doc_id varchar, "
                    "source_id varchar, text varchar, n_tokens bigint, n_chars bigint, source varchar, "
                    "file varchar, line bigint, fields varchar)")
        for role, texts in (("pool", pool), ("target", target)):
            for i, text in enumerate(texts):
                con.execute("insert into ingest_docs values ('ing', ?, ?, ?, null, ?, 10, ?, 's', 'f', ?, null)",
                            [role, i, f"{role}{i}", text, len(text), i + 1])
    return StageRef("ingest", "ing", store, n_pool + n_target, "fp")


def _tables(store, feats: StageRef, scores: StageRef) -> dict[str, list]:
    with connect(store, read_only=True) as con:
        return {
            "vectors": con.execute("select role, doc_idx, vec from featurize_vectors where key = ? "
                                   "order by role, doc_idx", [feats.key]).fetchall(),
            "ngrams": con.execute("select role, doc_idx, buckets, counts from featurize_ngrams where key = ? "
                                  "order by role, doc_idx", [feats.key]).fetchall(),
            "scores": con.execute("select doc_idx, scorer, version, score, detail from score_docs where key = ? "
                                  "order by scorer, doc_idx", [scores.key]).fetchall(),
            "totals": con.execute("select role, bucket, total from featurize_totals where key = ? order by all",
                                  [feats.key]).fetchall(),
            "info": [(name, {k: v for k, v in json.loads(params).items() if k != "shards"})
                     for name, params in con.execute("select scorer, params from score_info where key = ? "
                                                     "order by scorer", [scores.key]).fetchall()],
        }


def _run(docs: StageRef, run: RunSettings) -> tuple[StageRef, StageRef]:
    feats = featurize.fn(FEAT, docs, 0, run)
    return feats, score.fn(SCORE, docs, feats, 0, run)


def test_results_do_not_depend_on_the_shard_size(tmp_path):
    whole = make_docs(tmp_path / "a")
    sharded = make_docs(tmp_path / "b")
    fa, sa = _run(whole, RunSettings(shard_docs=10_000))
    fb, sb = _run(sharded, RunSettings(shard_docs=7))
    assert (fa.key, sa.key) == (fb.key, sb.key)  # shard size is how, not what: not in the keys
    a, b = _tables(whole.store, fa, sa), _tables(sharded.store, fb, sb)
    assert a == b
    assert len(b["scores"]) == 45 * 4  # 3 scorers + combined, each document once
    # ... and the same as the whole pool scored in memory
    from quadflow.tasks.featurize import load_ngrams
    from quadflow.tasks.score import build_scorers, score_pool
    from quadflow.tasks.scorers import ScoreInput
    with connect(whole.store, read_only=True) as con:
        texts = pl.Series("text", [t for (t,) in con.execute(
            "select text from ingest_docs where role = 'pool' order by doc_idx").fetchall()])
        tokens = np.array([n for (n,) in con.execute(
            "select n_tokens from ingest_docs where role = 'pool' order by doc_idx").fetchall()])
        data = ScoreInput(n_docs=45, texts=texts, ngrams=load_ngrams(con, fa.key, "pool"),
                          target_ngrams=load_ngrams(con, fa.key, "target"), tokens=tokens)
    frame, _ = score_pool(build_scorers(SCORE, SCORE.resolved(True), 0), data)
    assert sorted(frame.rows()) == sorted(b["scores"])
    failed = dict(b["info"])["heuristic"]["failed"]  # per-shard rule counts, merged: the same as in one piece
    assert failed == dict(a["info"])["heuristic"]["failed"] and sum(failed.values()) > 0
    with connect(sharded.store, read_only=True) as con:
        done = con.execute("select stage, role, count(*), sum(hi - lo) from shard_done group by all "
                           "order by all").fetchall()
    assert done == [("featurize", "pool", 7, 45), ("featurize", "target", 1, 6), ("score", "pool", 7, 45)]
    assert not (tmp_path / "b" / "store.duckdb.parts" / f"featurize-{fb.key}").exists()  # parts cleaned


def test_each_shards_texts_are_exported_once_for_every_stage_that_reads_them(tmp_path):
    """dedup, featurize and score read the same shard texts: exported by the first stage, reused by the others."""
    from quadflow.settings import DedupSettings
    from quadflow.tasks.dedup import dedup

    docs = make_docs(tmp_path)
    run = RunSettings(shard_docs=10)
    texts = Path(text_parts(run, docs.store.path, docs.key).root)
    dedup.fn(DedupSettings(), docs, 0, run)
    after_dedup = {p.name: p.stat().st_mtime_ns for p in texts.iterdir()}
    assert sorted(after_dedup) == [f"in-pool-{lo:012d}-{min(lo + 10, 45):012d}.parquet" for lo in range(0, 45, 10)]
    feats, scores = _run(docs, run)
    after = {p.name: p.stat().st_mtime_ns for p in texts.iterdir()}
    # featurize added the target's texts and rewrote none of the pool's; score exported nothing
    assert {k: v for k, v in after.items() if k in after_dedup} == after_dedup
    assert sorted(set(after) - set(after_dedup)) == [f"in-target-{0:012d}-{6:012d}.parquet"]
    assert sorted(p.name for p in texts.parent.iterdir()) == [texts.name]  # the stages' own parts are gone
    with connect(docs.store, read_only=True) as con:
        assert con.execute("select count(*) from score_docs where key = ?", [scores.key]).fetchone()[0] == 45 * 4


def test_shard_texts_are_exported_under_the_lower_duckdb_cap(tmp_path, monkeypatch):
    # DuckDB keeps the blocks it reads cached up to its cap, so exporting every shard's texts grew the flow
    # process with the pool: each export runs under EXPORT_MEMORY_LIMIT, and the store's cap comes back after
    import quadflow.shards as shards_mod
    from quadflow.settings import DedupSettings
    from quadflow.tasks.dedup import dedup

    docs = make_docs(tmp_path)
    caps, real = [], shards_mod.query_sql

    def spy(con, name, params=None):
        if name == "shard_texts_range":
            caps.append(con.execute("select current_setting('memory_limit')").fetchone()[0])
        return real(con, name, params)

    monkeypatch.setattr(shards_mod, "query_sql", spy)
    dedup.fn(DedupSettings(), docs, 0, RunSettings(shard_docs=10))
    with connect(docs.store) as con:
        store_cap = con.execute("select current_setting('memory_limit')").fetchone()[0]
        with capped_memory(con) as cap:
            assert cap == "256MB" and con.execute("select current_setting('memory_limit')").fetchone()[0] == caps[0]
        assert con.execute("select current_setting('memory_limit')").fetchone()[0] == store_cap
    assert len(caps) == 5 and set(caps) == {caps[0]} and caps[0] != store_cap
    monkeypatch.setenv("QUADFLOW_DUCKDB_MEMORY", "128MB")  # a store capped lower keeps its own cap
    with connect(docs.store) as con, capped_memory(con) as cap:
        assert cap == "128MB"


class _Crash(RuntimeError):
    pass


class _Flaky:
    """A shard task that completes `ok` shards (writing their parts) and then crashes, like a killed run."""

    def __init__(self, task, ok: int, finish_part_of_next: bool = False):
        self.task, self.ok, self.finish_next, self.calls = task, ok, finish_part_of_next, []

    def fn(self, shard: Shard, input_path: str, output_path: str, **kwargs):
        self.calls.append(shard)
        if len(self.calls) > self.ok:
            if self.finish_next:  # the part got written, the process died before the store recorded it
                self.task.fn(shard, input_path, output_path, **kwargs)
            raise _Crash(f"killed during {shard.name}")
        return self.task.fn(shard, input_path, output_path, **kwargs)


class _Counting:
    def __init__(self, task):
        self.task, self.calls = task, []

    def fn(self, shard: Shard, *args, **kwargs):
        self.calls.append(shard)
        return self.task.fn(shard, *args, **kwargs)


def test_a_crashed_stage_resumes_without_redoing_or_double_counting_shards(tmp_path, monkeypatch):
    clean = make_docs(tmp_path / "clean")
    fc, sc = _run(clean, RunSettings(shard_docs=10))
    expected = _tables(clean.store, fc, sc)

    docs = make_docs(tmp_path / "crash")
    run = RunSettings(shard_docs=10)
    flaky = _Flaky(featurize_mod.featurize_shard, ok=2, finish_part_of_next=True)
    monkeypatch.setattr(featurize_mod, "featurize_shard", flaky)
    with pytest.raises(_Crash):
        featurize.fn(FEAT, docs, 0, run)
    counting = _Counting(flaky.task)
    monkeypatch.setattr(featurize_mod, "featurize_shard", counting)
    feats = featurize.fn(FEAT, docs, 0, run)
    # 2 shards were in the store, the third's part was finished: only the other 3 of 6 are computed
    assert [(s.role, s.lo) for s in counting.calls] == [("pool", 30), ("pool", 40), ("target", 0)]

    flaky = _Flaky(score_mod.score_shard, ok=3)
    monkeypatch.setattr(score_mod, "score_shard", flaky)
    with pytest.raises(_Crash):
        score.fn(SCORE, docs, feats, 0, run)
    counting = _Counting(flaky.task)
    monkeypatch.setattr(score_mod, "score_shard", counting)
    scores = score.fn(SCORE, docs, feats, 0, run)
    assert [s.lo for s in counting.calls] == [30, 40]
    assert _tables(docs.store, feats, scores) == expected  # identical to the uninterrupted run
    with connect(docs.store, read_only=True) as con:
        sources = con.execute("select stage, source, count(*) from shard_done group by all order by all").fetchall()
    assert sources == [("featurize", "computed", 5), ("featurize", "recovered", 1), ("score", "computed", 5)]


def _keys(admin, bucket: str, prefix: str) -> list[str]:
    return sorted(o["Key"] for page in admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                  for o in page.get("Contents", []))


def test_parts_on_an_object_store_give_the_same_results_and_resume_from_finished_parts(
        tmp_path, monkeypatch, s3_settings, s3_admin, s3_bucket):
    """run.parts = s3://...: inputs, fitted state and outputs go through the bucket, never a local directory;
    a crash leaves whole parts there, and the rerun loads the finished one instead of recomputing it."""
    clean = make_docs(tmp_path / "clean")
    fc, sc = _run(clean, RunSettings(shard_docs=10))
    expected = _tables(clean.store, fc, sc)

    docs = make_docs(tmp_path / "s3")
    run = RunSettings(shard_docs=10, parts=f"s3://{s3_bucket}/parts/")
    flaky = _Flaky(featurize_mod.featurize_shard, ok=2, finish_part_of_next=True)
    monkeypatch.setattr(featurize_mod, "featurize_shard", flaky)
    with pytest.raises(_Crash):
        featurize.fn(FEAT, docs, 0, run, s3_settings)
    left = [k.removeprefix("parts/").split("-", 1)[0] + "/" + k.rsplit("/", 1)[-1]
            for k in _keys(s3_admin, s3_bucket, "parts/")]
    # the fitted LSA, the crashed shard's finished output, and the texts of the three shards that were
    # submitted (kept for the other stages): all whole objects; the two recorded outputs were moved into the
    # store's data directory, which its views read
    assert sorted(left) == sorted(["featurize/lsa.npz", "featurize/out-pool-000000000020-000000000030.parquet",
                                   "texts/in-pool-000000000000-000000000010.parquet",
                                   "texts/in-pool-000000000010-000000000020.parquet",
                                   "texts/in-pool-000000000020-000000000030.parquet"])
    kept = sorted(p.name for p in (tmp_path / "s3" / "store.duckdb.data" / "featurize").glob("key=*/role=*/*"))
    assert kept == ["000000000000-000000000010.parquet", "000000000010-000000000020.parquet"]
    counting = _Counting(flaky.task)
    monkeypatch.setattr(featurize_mod, "featurize_shard", counting)
    feats = featurize.fn(FEAT, docs, 0, run, s3_settings)
    assert [(s.role, s.lo) for s in counting.calls] == [("pool", 30), ("pool", 40), ("target", 0)]
    scores = score.fn(SCORE, docs, feats, 0, run, s3_settings)
    assert _tables(docs.store, feats, scores) == expected  # identical to a run on local parts
    with connect(docs.store, read_only=True) as con:
        sources = con.execute("select stage, source, count(*) from shard_done group by all order by all").fetchall()
    assert sources == [("featurize", "computed", 5), ("featurize", "recovered", 1), ("score", "computed", 5)]
    # each stage's parts went once it was complete; the shared texts stay until the flow removes them
    texts = text_parts(run, docs.store.path, docs.key, s3_settings)
    assert {k.rsplit("/", 2)[-2] for k in _keys(s3_admin, s3_bucket, "parts/")} == {texts.root.rsplit("/", 1)[-1]}
    texts.clean()
    assert _keys(s3_admin, s3_bucket, "parts/") == []
    assert not (tmp_path / "s3" / "store.duckdb.parts").exists()


def test_an_unreachable_parts_bucket_fails_before_any_work_naming_it(tmp_path, s3_settings):
    docs = make_docs(tmp_path)
    with pytest.raises(ConfigError, match="qf-no-such-bucket"):
        featurize.fn(FEAT, docs, 0, RunSettings(parts="s3://qf-no-such-bucket/parts"), s3_settings)
    with connect(docs.store, read_only=True) as con:
        assert con.execute("select count(*) from featurize_vectors").fetchone() == (0,)


@pytest.mark.parametrize("bad, why", [("s3:///parts", "no valid bucket"), ("gs://b/parts", "only local"),
                                      (" ", "empty")])
def test_parts_must_be_a_directory_or_an_s3_prefix(bad, why):
    with pytest.raises(ValueError, match=why):
        RunSettings(parts=bad)


# --------------------------------------------------------------------------- ingest dedup by hash range


@hsettings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 12), min_size=0, max_size=15), min_size=1, max_size=5), st.integers(1, 9))
def test_dedup_by_hash_range_matches_the_in_memory_one(inputs, n_ranges):
    """However many hash ranges, the same copies are dropped, each pointing at the same kept copy, as one
    pass over every id in load order (documents the partition already holds first)."""
    held = pl.DataFrame({"doc_id": [doc_id("text 3")], "file": ["base"], "line": [9]})
    mem = Deduplicator().preload(held)
    every = [sorted_ids(held).with_columns(pos=pl.lit(-1, pl.Int64))]
    expected = []
    for pos, ids in enumerate(inputs):
        good = pl.DataFrame({"role": ["pool"] * len(ids), "doc_id": [doc_id(f"text {i}") for i in ids],
                             "file": [f"f{pos}"] * len(ids), "line": list(range(1, len(ids) + 1))},
                            schema={"role": pl.String, "doc_id": pl.String, "file": pl.String, "line": pl.Int64})
        _, dups = mem.update(good)
        expected += [(pos, *row) for row in dups.select("file", "line", "doc_id", "kept_file", "kept_line").rows()]
        every.append(sorted_ids(good).with_columns(pos=pl.lit(pos, pl.Int64)))
    ids = pl.concat(every)
    ranges = [hash_range(i, n_ranges, HASH_SPACE) for i in range(n_ranges)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 1 << 32 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    found = pl.concat([first_copies(ids.filter(pl.col("h").is_between(lo, hi, closed="left"))) for lo, hi in ranges])
    assert found.sort("pos", "line").rows() == expected


def test_hash_ranges_follow_the_documents_within_bounds():
    """About 8 x shard_docs documents per range; at least one; at most MAX_HASH_RANGES, however large the pool
    (the flow's process reads every range's output at once)."""
    assert [hash_ranges(n, 50_000) for n in (0, 1, 400_000, 400_001, 5_000_000)] == [1, 1, 1, 2, 13]
    assert hash_ranges(10**9, 50_000) == MAX_HASH_RANGES == 256


# --------------------------------------------------------------------------- ingest resumes per input


def _corpus(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    lines = {
        "a.jsonl": ['{"text": "first document about lists"}', '{"text": "shared text"}', "not json"],
        "b.jsonl": ['{"text": "shared text"}', '{"text": "second file, new words"}'],
        "c.jsonl": ['{"text": "third file"}', '{"text": "first document about lists"}', '{"text": ""}'],
    }
    for name, rows in lines.items():
        (pool / name).write_text("\n".join(rows) + "\n")
    return pool


def _ingest_tables(store, key):
    with connect(store, read_only=True) as con:
        out = {t: con.execute(f"select * exclude (key) from {t} where key = ? order by all", [key]).fetchall()
               for t in ("ingest_docs", "ingest_duplicates", "ingest_quarantine", "ingest_files")}
        out["runs"] = con.execute("select inputs, read, docs_reused from ingest_runs where key = ?", [key]).fetchall()
    return out


def test_a_crashed_ingest_resumes_at_the_first_input_it_had_not_committed(tmp_path, monkeypatch):
    from quadflow.settings import IngestSettings
    from quadflow.tasks import ingest as ingest_mod
    from quadflow.tasks.ingest import expand_inputs, fingerprint_files, ingest

    pool = _corpus(tmp_path)
    settings = IngestSettings(inputs=[str(pool)], batch_rows=1)
    files = fingerprint_files(expand_inputs(settings.inputs))
    clean = ingest.fn(settings, files, (), open_store(tmp_path / "clean.duckdb"))
    expected = _ingest_tables(clean.store, clean.key)

    store = open_store(tmp_path / "crash.duckdb")
    real, calls = ingest_mod._load_input, []

    def dies_in_the_second_file(con, key, fp, *args):
        calls.append(fp.path)
        if len(calls) == 2:  # killed half way through loading b.jsonl: its rows so far must not survive
            real(con, key, fp, *args)
            raise _Crash(f"killed while loading {fp.path}")
        return real(con, key, fp, *args)

    monkeypatch.setattr(ingest_mod, "_load_input", dies_in_the_second_file)
    with pytest.raises(_Crash):
        ingest.fn(settings, files, (), store)
    calls.clear()
    monkeypatch.setattr(ingest_mod, "_load_input", lambda con, key, fp, *a: (calls.append(fp.path),
                                                                            real(con, key, fp, *a)))
    parsed = _Counting(ingest_mod.ingest_read)
    monkeypatch.setattr(ingest_mod, "ingest_read", parsed)
    ref = ingest.fn(settings, files, (), store)
    assert [p.rsplit("/", 1)[1] for p in calls] == ["b.jsonl", "c.jsonl"]  # a.jsonl was committed: not read again
    assert [s.lo for s in parsed.calls] == [1, 2]  # ... nor parsed
    assert ref.key == clean.key and _ingest_tables(store, ref.key) == expected
    assert not (tmp_path / "crash.duckdb.parts").exists()  # parsed parts removed once the partition is complete


def test_inputs_parsed_by_worker_processes_give_the_partition_parsing_here_gives(tmp_path, prefect_server, caplog):
    """Shard tasks on a process pool parse the inputs in any order and find the exact duplicates in several
    hash ranges; loading in input order keeps the same copy of every duplicate, so the partition is the one
    a single process builds with one range."""
    import os

    from prefect import flow
    from prefect.task_runners import ProcessPoolTaskRunner

    from quadflow.settings import IngestSettings
    from quadflow.tasks.ingest import expand_inputs, fingerprint_files, ingest

    pool = _corpus(tmp_path)
    for i in range(4):  # more inputs than workers, each repeating documents of the others
        rows = [f'{{"text": "shared document {j}"}}' for j in range(i, i + 3)] + [f'{{"text": "own {i}"}}', "{bad"]
        (pool / f"d{i}.jsonl").write_text("\n".join(rows) + "\n")
    settings = IngestSettings(inputs=[str(pool)], batch_rows=2)
    files = fingerprint_files(expand_inputs(settings.inputs))
    here = ingest.fn(settings, files, (), open_store(tmp_path / "here.duckdb"))

    @flow(task_runner=ProcessPoolTaskRunner(max_workers=2))
    def ingest_on_workers():
        return ingest(settings, files, (), open_store(tmp_path / "workers.duckdb"), run=RunSettings(shard_docs=1))

    ref = ingest_on_workers()
    assert "exact dedup of 22 pool ids in 3 hash ranges" in caplog.text  # 22 / (8 x shard_docs), not 1
    assert ref.key == here.key
    assert _ingest_tables(ref.store, ref.key) == _ingest_tables(here.store, here.key)
    with connect(ref.store, read_only=True) as con:
        workers = con.execute("select worker from shard_done where stage = 'ingest' and role = 'pool'").fetchall()
    assert len(workers) == len(files) == 7
    assert all(not w.endswith(f":{os.getpid()}") for (w,) in workers)  # parsed in the pool's processes


# --------------------------------------------------------------------------- featurize parts read in place


def _relations(store, like: str = "featurize_%") -> dict[str, str]:
    with duckdb.connect(store.path, read_only=True) as con:
        return dict(con.execute("select table_name, table_type from information_schema.tables "
                                "where table_name like ?", [like]).fetchall())


def _features(store, key: str) -> dict[str, list]:
    with connect(store, read_only=True) as con:
        return {"vectors": con.execute("select role, doc_idx, vec from featurize_vectors where key = ? "
                                       "order by role, doc_idx", [key]).fetchall(),
                "ngrams": con.execute("select role, doc_idx, buckets, counts from featurize_ngrams where key = ? "
                                      "order by role, doc_idx", [key]).fetchall()}


def test_featurize_keeps_its_shard_parts_and_the_store_reads_them_in_place(tmp_path, monkeypatch):
    """No featurize row is loaded into the DuckDB file: the views read the shard tasks' parts, and a rerun cut
    into other shards (or missing a part) neither doubles nor loses a document."""
    docs = make_docs(tmp_path)
    feats = featurize.fn(FEAT, docs, 0, RunSettings(shard_docs=10))
    assert _relations(docs.store) == {"featurize_vectors": "VIEW", "featurize_ngrams": "VIEW",
                                      "featurize_info": "BASE TABLE", "featurize_totals": "BASE TABLE"}
    data = tmp_path / "store.duckdb.data" / "featurize" / f"key={feats.key}"
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*.parquet")) == (
        [f"role=pool/{lo:012d}-{min(lo + 10, 45):012d}.parquet" for lo in range(0, 45, 10)]
        + ["role=target/000000000000-000000000006.parquet"])
    want = _features(docs.store, feats.key)
    assert len(want["vectors"]) == len(want["ngrams"]) == 51
    with connect(docs.store, read_only=True) as con:  # the shard tasks' n-gram totals: a scan's, per role
        scanned = con.execute("select role, bucket, sum(n)::bigint from (select role, unnest(buckets) as bucket, "
                              "unnest(counts) as n from featurize_ngrams where key = ?) group by all order by all",
                              [feats.key]).fetchall()
        totals = con.execute("select role, bucket, total from featurize_totals where key = ? order by all",
                             [feats.key]).fetchall()
    assert totals == scanned and {r for r, _, _ in totals} == {"pool", "target"}

    again = featurize.fn(FEAT, docs, 0, RunSettings(shard_docs=7))  # same key, other shards
    assert again == feats and _features(docs.store, feats.key) == want
    assert len(list(data.rglob("*.parquet"))) == 7 + 1  # the shards of 10 are gone with their ledger rows

    lost = next(data.rglob("role=pool/000000000007-*.parquet"))
    lost.unlink()  # e.g. deleted by hand: that shard is computed again, the others are kept
    counting = _Counting(featurize_mod.featurize_shard)
    monkeypatch.setattr(featurize_mod, "featurize_shard", counting)
    assert featurize.fn(FEAT, docs, 0, RunSettings(shard_docs=7)) == feats
    assert [(s.role, s.lo) for s in counting.calls] == [("pool", 7)]
    assert _features(docs.store, feats.key) == want


def test_featurize_tables_of_an_older_store_give_way_to_the_views(tmp_path):
    """A store written when featurize rows were loaded into tables: featurize drops them and their ledger."""
    docs = make_docs(tmp_path)
    with duckdb.connect(docs.store.path) as con:
        con.execute("create table featurize_vectors (key varchar, role varchar, doc_idx bigint, vec float[])")
        con.execute("create table featurize_ngrams (key varchar, role varchar, doc_idx bigint, "
                    "buckets usmallint[], counts usmallint[])")
        con.execute("insert into featurize_vectors values ('old', 'pool', 0, [1.0, 0.0])")
        con.execute("create table shard_done (stage varchar, key varchar, role varchar, lo bigint, hi bigint, "
                    "rows bigint, seconds double, worker varchar, info varchar, source varchar, done_at timestamp)")
        con.execute("insert into shard_done values ('featurize', 'old', 'pool', 0, 45, 45, 1, 'w', null, "
                    "'computed', now()::timestamp)")
    feats = featurize.fn(FEAT, docs, 0, RunSettings(shard_docs=20))
    assert _relations(docs.store)["featurize_vectors"] == "VIEW"
    with connect(docs.store, read_only=True) as con:
        assert con.execute("select key, count(*) from featurize_vectors group by key").fetchall() == [(feats.key, 51)]
        assert con.execute("select distinct key from shard_done").fetchall() == [(feats.key,)]


def test_a_store_whose_data_directory_is_gone_says_so(tmp_path):
    docs = make_docs(tmp_path)
    featurize.fn(FEAT, docs, 0, RunSettings(shard_docs=20))
    shutil.rmtree(tmp_path / "store.duckdb.data")
    other = FEAT.model_copy(update={"dim": 4})  # another partition: the first one's parts are still recorded
    with pytest.raises(FileNotFoundError, match=r"store.duckdb.data.*moved or deleted apart from the store"):
        featurize.fn(other, docs, 0, RunSettings(shard_docs=20))


# --------------------------------------------------------------------------- cluster


CLUSTER = ClusterSettings(k=4, batch_size=64, balance="docs")


def _clusters(store, key: str) -> dict[str, list]:
    with connect(store, read_only=True) as con:
        return {name: con.execute(sql, [key]).fetchall() for name, sql in {
            "assignments": "select doc_idx, cluster, distance from cluster_assignments where key = ? order by doc_idx",
            "centroids": "select cluster, size, vec from cluster_centroids where key = ? order by cluster",
            "neighbors": "select cluster, neighbor, distance from cluster_neighbors where key = ? order by all",
            "info": "select k, gamma, round(inertia, 9) from cluster_info where key = ?",
        }.items()}


class _Inputs:
    """Records, per pass-1 shard, whether its input part is featurize's kept part itself (a hard link)."""

    def __init__(self, task, data: Path):
        self.task, self.data, self.linked = task, data, []

    def fn(self, shard: Shard, input_path: str, *args, **kwargs):
        kept = self.data / f"role=pool/{shard.lo:012d}-{shard.hi:012d}.parquet"
        self.linked.append(kept.is_file() and Path(input_path).stat().st_ino == kept.stat().st_ino)
        return self.task.fn(shard, input_path, *args, **kwargs)


def test_cluster_reads_featurize_parts_and_its_assignments_do_not_depend_on_the_shards(tmp_path, monkeypatch):
    """The two passes run as shard tasks: inputs are featurize's kept parts (linked, not copied) when featurize cut
    the pool the same way, else rows read from the view; either way, and in any shard size, the same clusters."""
    docs = make_docs(tmp_path)
    feats = featurize.fn(FEAT, docs, 0, RunSettings(shard_docs=10))
    inputs = _Inputs(cluster_mod.cluster_sums_shard, tmp_path / "store.duckdb.data" / "featurize" / f"key={feats.key}")
    monkeypatch.setattr(cluster_mod, "cluster_sums_shard", inputs)
    ref = cluster.fn(CLUSTER, feats, 0, docs, RunSettings(shard_docs=10))
    assert inputs.linked == [True] * 5
    assert _relations(docs.store, "cluster_%") == {"cluster_assignments": "VIEW", "cluster_centroids": "BASE TABLE",
                                                   "cluster_neighbors": "BASE TABLE", "cluster_info": "BASE TABLE"}
    data = tmp_path / "store.duckdb.data" / "cluster" / f"key={ref.key}"
    assert sorted(p.name for p in data.rglob("*.parquet")) == [
        f"{lo:012d}-{min(lo + 10, 45):012d}.parquet" for lo in range(0, 45, 10)]
    assert (tmp_path / "store.duckdb.data" / "featurize" / f"key={feats.key}" / "role=pool").is_dir()  # kept
    assert not (tmp_path / "store.duckdb.parts" / f"cluster-{ref.key}").exists()  # the stage's parts are gone
    want = _clusters(docs.store, ref.key)
    assert len(want["assignments"]) == 45 and sum(size for _, size, _ in want["centroids"]) == 45

    inputs.linked.clear()
    assert cluster.fn(CLUSTER, feats, 0, docs, RunSettings(shard_docs=7)) == ref  # same key, other shards
    assert inputs.linked == [False] * 7  # featurize has no part of these bounds: read from the view
    assert _clusters(docs.store, ref.key) == want
    assert len(list(data.rglob("*.parquet"))) == 7  # the shards of 10 went with their ledger rows


def test_a_crashed_cluster_stage_reuses_its_model_and_resumes_pass_two(tmp_path, monkeypatch):
    clean = make_docs(tmp_path / "clean")
    fc = featurize.fn(FEAT, clean, 0, RunSettings(shard_docs=10))
    expected = _clusters(clean.store, cluster.fn(CLUSTER, fc, 0, clean, RunSettings(shard_docs=10)).key)

    docs = make_docs(tmp_path / "crash")
    run = RunSettings(shard_docs=10)
    feats = featurize.fn(FEAT, docs, 0, run)
    flaky = _Flaky(cluster_mod.cluster_shard, ok=2, finish_part_of_next=True)
    monkeypatch.setattr(cluster_mod, "cluster_shard", flaky)
    with pytest.raises(_Crash):
        cluster.fn(CLUSTER, feats, 0, docs, run)
    sums, assign = _Counting(cluster_mod.cluster_sums_shard), _Counting(flaky.task)
    monkeypatch.setattr(cluster_mod, "cluster_sums_shard", sums)
    monkeypatch.setattr(cluster_mod, "cluster_shard", assign)
    ref = cluster.fn(CLUSTER, feats, 0, docs, run)
    assert sums.calls == []  # the model (centroids from pass 1) was saved before pass 2 began
    assert [s.lo for s in assign.calls] == [30, 40]  # 2 recorded, the third's finished part recovered
    assert _clusters(docs.store, ref.key) == expected
    with connect(docs.store, read_only=True) as con:
        sources = con.execute("select source, count(*) from shard_done where stage = 'cluster' group by all "
                              "order by all").fetchall()
    assert sources == [("computed", 4), ("recovered", 1)]


def test_cluster_parts_on_an_object_store_give_the_same_clusters(tmp_path, s3_settings, s3_admin, s3_bucket):
    local = make_docs(tmp_path / "local")
    fl = featurize.fn(FEAT, local, 0, RunSettings(shard_docs=10))
    expected = _clusters(local.store, cluster.fn(CLUSTER, fl, 0, local, RunSettings(shard_docs=10)).key)
    docs = make_docs(tmp_path / "s3")
    run = RunSettings(shard_docs=10, parts=f"s3://{s3_bucket}/parts/")
    feats = featurize.fn(FEAT, docs, 0, run, s3_settings)
    ref = cluster.fn(CLUSTER, feats, 0, docs, run, s3_settings)
    assert _clusters(docs.store, ref.key) == expected
    # the stage's inputs, model and outputs went through the bucket and are gone; only the shared texts remain
    assert {k.removeprefix("parts/").split("-", 1)[0] for k in _keys(s3_admin, s3_bucket, "parts/")} == {"texts"}

