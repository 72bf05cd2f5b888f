"""Ingest: readers, quarantine reasons, ids, dedup, input resolution and the task's tables."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import given, settings as hsettings, strategies as st

from quadflow.settings import ConfigError, IngestSettings
from quadflow.store import open_store
from quadflow.text import content_hash, count_tokens
from quadflow.tasks import ingest as ing
from quadflow.tasks.ingest import (
    Deduplicator,
    FileFingerprint,
    InputError,
    doc_id,
    expand_inputs,
    fingerprint_files,
    ingest,
    read_file,
)


def _write(path, lines: list[str | bytes], compression: str | None = None) -> str:
    data = b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines)
    if compression == "gzip":
        data = gzip.compress(data)
    elif compression == "zstd":  # two frames: readers must not stop after the first
        half = len(data) // 2
        c = zstandard.ZstdCompressor()
        data = c.compress(data[:half]) + c.compress(data[half:])
    path.write_bytes(data)
    return str(path)


def _read(path, **kw) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    batches = list(read_file(path, "pool", **kw))
    good = pl.concat([b.good for b in batches]) if batches else pl.DataFrame(schema=ing.DOC_SCHEMA)
    bad = pl.concat([b.bad for b in batches]) if batches else pl.DataFrame(schema=ing.BAD_SCHEMA)
    return good, bad, sum(b.records for b in batches)


def _rec(text, **fields) -> str:
    return json.dumps({"text": text, **fields})


# --------------------------------------------------------------------------- records and reasons


def test_each_bad_record_is_quarantined_with_its_reason_and_line(tmp_path):
    lines = [
        _rec("Hello world.", id=1),                     # 1 good
        '{"text": "unterminated',                       # 2
        "[1, 2, 3]",                                    # 3
        '{"title": "no text here"}',                    # 4
        '{"text": null}',                               # 5
        '{"text": 42}',                                 # 6
        '{"text": ["a", "b"]}',                         # 7
        '{"text": "  \\n\\t "}',                        # 8
        '{"text": ""}',                                 # 9
        b'{"text": "caf\xe9 au lait"}',                 # 10: latin-1 byte
        _rec("x" * 51),                                 # 11
        "",                                             # 12: blank line, not a record
        '{"text": "lone \\ud800 surrogate"}',           # 13
        _rec("Second good one!", id="b"),               # 14
    ]
    path = _write(tmp_path / "mixed.jsonl", lines)
    good, bad, records = _read(path, max_doc_chars=50)

    assert good["line"].to_list() == [1, 14]
    assert dict(zip(bad["line"].to_list(), bad["reason"].to_list())) == {
        2: "malformed_json", 3: "not_an_object", 4: "missing_text", 5: "missing_text", 6: "wrong_type",
        7: "wrong_type", 8: "empty_text", 9: "empty_text", 10: "undecodable", 11: "oversize", 13: "undecodable",
    }
    assert records == 13  # the blank line is not a record; nothing else is dropped
    assert set(bad["file"]) == {path} and set(bad["role"]) == {"pool"}
    row = bad.filter(pl.col("line") == 10).row(0, named=True)
    assert row["excerpt"] == '{"text": "caf\ufffd au lait"}' and "byte" in row["detail"]
    assert "int" in bad.filter(pl.col("line") == 6)["detail"][0]
    assert set(bad["reason"]) <= set(ing.REASONS)


def test_excerpt_is_first_200_chars_of_the_raw_line(tmp_path):
    raw = '{"text": ' + "9" * 500
    good, bad, _ = _read(_write(tmp_path / "a.jsonl", [raw]))
    assert bad["reason"].to_list() == ["malformed_json"]
    assert bad["excerpt"][0] == raw[:200]


def test_good_record_carries_tokens_ids_source_and_fields(tmp_path):
    text = "The quick  brown fox, jumps!\nOver the lazy dog."
    path = _write(tmp_path / "docs.jsonl", [
        _rec(text, id=7, source="wiki", lang="en", meta={"k": [1, 2]}),
        _rec("No other fields."),
        _rec("Source is not a string.", source=3, id="x-1"),
    ])
    good, bad, _ = _read(path)
    assert bad.height == 0
    first, second, third = good.rows(named=True)
    assert first["text"] == text
    assert first["n_tokens"] == count_tokens(text) == 12
    assert first["n_chars"] == len(text)
    assert first["doc_id"] == content_hash(text)
    assert first["source_id"] == "7" and first["source"] == "wiki"
    assert json.loads(first["fields"]) == {"id": 7, "source": "wiki", "lang": "en", "meta": {"k": [1, 2]}}
    assert second["fields"] is None and second["source_id"] is None and second["source"] == "docs.jsonl"
    assert third["source"] == "docs.jsonl" and third["source_id"] == "x-1"


def test_custom_text_and_id_fields(tmp_path):
    path = _write(tmp_path / "c.jsonl", ['{"body": "Custom field text.", "text": "other", "uid": 9}'])
    good, _, _ = _read(path, text_field="body", id_field="uid")
    assert good["text"].to_list() == ["Custom field text."]
    assert good["source_id"].to_list() == ["9"]
    assert json.loads(good["fields"][0]) == {"text": "other", "uid": 9}
    good, _, _ = _read(path, text_field="body", id_field=None)
    assert good["source_id"].to_list() == [None]


def test_utf8_bom_and_crlf_line_endings_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _rec("first").encode() + b"\r\n" + _rec("second").encode() + b"\r\n")
    good, bad, _ = _read(str(path))
    assert good["text"].to_list() == ["first", "second"] and bad.height == 0


WS = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2009\u2028\u2029\u202f\u3000"


_TRICKY = st.sampled_from(WS + "aAİıΣσςﬁ①Å")  # whitespace, case and NFKC edge cases


@given(st.text(alphabet=st.one_of(_TRICKY, st.characters(exclude_categories=["Cs"]))))
@hsettings(max_examples=300, deadline=None, database=None)
def test_doc_id_equals_the_shared_content_hash(text):
    assert doc_id(text) == content_hash(text)


@given(st.lists(st.binary(max_size=12).filter(lambda b: b"\n" not in b), max_size=8),
       st.lists(st.integers(1, 7), min_size=1, max_size=20), st.booleans())
@hsettings(max_examples=200, deadline=None, database=None)
def test_line_splitting_is_independent_of_chunking(lines, cuts, trailing_newline):
    data = b"\n".join(lines) + (b"\n" if trailing_newline and lines else b"")
    chunks, i, k = [], 0, 0
    while i < len(data):
        step = cuts[k % len(cuts)]
        chunks.append(data[i:i + step])
        i, k = i + step, k + 1
    expected = data.split(b"\n")
    if expected and expected[-1] == b"":
        expected.pop()
    assert list(ing._lines(chunks)) == list(enumerate(expected, 1))


def test_batches_do_not_change_the_result(tmp_path):
    lines = [_rec(f"document number {i}") if i % 4 else "{bad" for i in range(25)]
    path = _write(tmp_path / "b.jsonl", lines)
    small = list(read_file(path, "pool", batch_rows=3))
    assert len(small) > 5 and all(b.good.height + b.bad.height <= 3 for b in small)
    g1, b1, n1 = _read(path, batch_rows=3)
    g2, b2, n2 = _read(path, batch_rows=1000)
    assert g1.equals(g2) and b1.equals(b2) and n1 == n2 == 25


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name,compression", [
    ("d.jsonl", None), ("d.json", None), ("d.ndjson", None), ("d.jsonl.gz", "gzip"), ("d.jsonl.zst", "zstd"),
    ("d.ndjson.zst", "zstd"), ("d.json.gz", "gzip"),
])
def test_jsonl_readers_agree_across_compressions(tmp_path, name, compression):
    lines = [_rec(f"Text number {i} with some words.", id=i) for i in range(300)] + ["not json"]
    plain, plain_bad, _ = _read(_write(tmp_path / "ref.jsonl", lines))
    good, bad, records = _read(_write(tmp_path / name, lines, compression), batch_rows=64)
    assert records == 301
    assert good.drop("file", "source").equals(plain.drop("file", "source"))
    assert bad.drop("file").equals(plain_bad.drop("file"))


def test_parquet_reader_rows_fields_and_bad_rows(tmp_path):
    path = tmp_path / "p.parquet"
    table = pa.table({
        "id": [10, 11, 12, 13, 14],
        "text": ["First row.", None, "", "Fourth row here.", "Fifth."],
        "lang": ["en", "de", "fr", "en", None],
    })
    pq.write_table(table, path, row_group_size=2)
    good, bad, records = _read(str(path), batch_rows=2)
    assert records == 5
    assert good["line"].to_list() == [1, 4, 5]
    assert good["source_id"].to_list() == ["10", "13", "14"]
    assert json.loads(good["fields"][0]) == {"id": 10, "lang": "en"}
    assert good["n_tokens"].to_list() == [count_tokens(t) for t in good["text"]]
    assert dict(zip(bad["line"], bad["reason"])) == {2: "missing_text", 3: "empty_text"}


def test_parquet_non_string_text_column_is_wrong_type(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    good, bad, _ = _read(str(path))
    assert good.height == 0 and bad["reason"].to_list() == ["wrong_type", "wrong_type"]


def test_parquet_without_text_column_is_an_input_error(tmp_path):
    path = tmp_path / "notext.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(InputError, match="notext.parquet.*'text'") as e:
        list(read_file(path, "pool"))
    assert isinstance(e.value, ConfigError)  # the CLI exits 2 on it


@pytest.mark.parametrize("name,compress", [
    ("a.txt", lambda b: b), ("a.txt.gz", gzip.compress), ("a.txt.zst", zstandard.ZstdCompressor().compress),
])
def test_txt_file_is_one_document(tmp_path, name, compress):
    text = "A whole file\n\nis one document.\n"
    (tmp_path / name).write_bytes(compress(text.encode()))
    good, bad, records = _read(str(tmp_path / name))
    assert records == 1 and bad.height == 0
    row = good.row(0, named=True)
    assert row["text"] == text and row["line"] == 1 and row["source"] == name and row["fields"] is None


def test_txt_bad_documents(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b" \n ")
    (tmp_path / "latin1.txt").write_bytes("ok then caf\xe9".encode("latin-1"))
    (tmp_path / "big.txt").write_bytes(b"y" * 5000)
    for name, reason in [("empty.txt", "empty_text"), ("latin1.txt", "undecodable"), ("big.txt", "oversize")]:
        good, bad, _ = _read(str(tmp_path / name), max_doc_chars=1000)
        assert good.height == 0 and bad["reason"].to_list() == [reason] and bad["line"].to_list() == [1]
    _, bad, _ = _read(str(tmp_path / "latin1.txt"))
    assert "byte 11" in bad["detail"][0]


_MANY = b"".join(b'{"text": "document %d"}\n' % i for i in range(20_000))
_GZ, _ZST = gzip.compress(_MANY), zstandard.ZstdCompressor().compress(_MANY)


@pytest.mark.parametrize("name,payload", [
    ("broken.jsonl.gz", b"this is not gzip at all"),
    ("trunc.jsonl.gz", _GZ[: len(_GZ) // 2]),
    ("broken.jsonl.zst", b"this is not zstd at all"),
    ("trunc.jsonl.zst", _ZST[: len(_ZST) // 2]),  # zstd readers return a cut frame silently unless checked
    ("trailing.jsonl.zst", _ZST + b"garbage after the frame"),
    ("broken.parquet", b"PAR1 nope"),
])
def test_broken_container_is_an_input_error_naming_the_file(tmp_path, name, payload):
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(InputError, match=name):
        list(read_file(tmp_path / name, "pool"))


# --------------------------------------------------------------------------- inputs


def test_expand_inputs_files_dirs_and_globs(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for rel in ["a/1.jsonl", "a/deep/2.jsonl.zst", "a/deep/3.parquet", "a/notes.md", "b.txt.gz", ".hidden/x.jsonl"]:
        (tmp_path / rel).write_bytes(b"")
    got = expand_inputs([str(tmp_path / "a"), str(tmp_path / "**" / "*.jsonl*"), str(tmp_path / "b.txt.gz"),
                         str(tmp_path / "a" / "1.jsonl")])
    rel = [str(p.relative_to(tmp_path)) for p in got]
    assert rel == ["a/1.jsonl", "a/deep/2.jsonl.zst", "a/deep/3.parquet", "b.txt.gz"]
    assert all(p.is_absolute() for p in got)


def test_expand_inputs_errors_name_the_pattern(tmp_path, monkeypatch):
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "ok.jsonl").write_text("")
    cases = [
        ([str(tmp_path / "missing.jsonl")], "missing.jsonl.*does not exist"),
        ([str(tmp_path / "*.parquet")], r"\*\.parquet.*matches nothing"),
        ([str(tmp_path / "*.csv")], r"\*\.csv.*no file with a supported extension"),
        ([str(tmp_path / "x.csv")], "x.csv.*unsupported extension"),
        ([str(tmp_path / "empty")], "empty.*no file with a supported extension"),
    ]
    for patterns, msg in cases:
        with pytest.raises(InputError, match=msg):
            expand_inputs(patterns)
    monkeypatch.setattr(ing.os, "access", lambda p, mode: not str(p).endswith("ok.jsonl"))
    with pytest.raises(InputError, match="ok.jsonl.*not readable"):
        expand_inputs([str(tmp_path / "ok.jsonl")])


def test_fingerprint_tracks_content(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"x" * (3 << 20))  # more than one 1 MiB chunk
    (fp,) = fingerprint_files([path])
    assert fp == FileFingerprint(str(path.resolve()), 3 << 20, path.stat().st_mtime_ns,
                                 hashlib.sha256(path.read_bytes()).hexdigest())
    path.write_bytes(b"y" * (3 << 20))
    assert fingerprint_files([path])[0].sha256 != fp.sha256
    with pytest.raises(InputError, match="gone.jsonl"):
        fingerprint_files([tmp_path / "gone.jsonl"])


# --------------------------------------------------------------------------- dedup


def test_dedup_keeps_first_copy_and_records_the_dropped_one(tmp_path):
    a = _write(tmp_path / "a.jsonl", [_rec("Same text."), _rec("Other."), _rec("  SAME   text. ")])
    b = _write(tmp_path / "b.jsonl", [_rec("Other."), _rec("New one.")])
    d = Deduplicator()
    kept_all, dups_all = [], []
    for path in (a, b):
        for batch in read_file(path, "pool", batch_rows=1):
            kept, dups = d.update(batch.good)
            kept_all.append(kept)
            dups_all.append(dups)
    kept, dups = pl.concat(kept_all), pl.concat(dups_all)
    assert kept.select("file", "line", "doc_idx").rows() == [(a, 1, 0), (a, 2, 1), (b, 2, 2)]
    assert dups.select("file", "line", "kept_file", "kept_line").rows() == [(a, 3, a, 1), (b, 1, a, 2)]
    assert set(dups["role"]) == {"pool"}


# --------------------------------------------------------------------------- task


def _tables(store_path, key):
    con = duckdb.connect(store_path, read_only=True)
    try:
        out = {}
        for t, order in [("ingest_docs", "role, doc_idx"), ("ingest_quarantine", "role, file, line"),
                         ("ingest_duplicates", "role, file, line"), ("ingest_files", "role, file")]:
            out[t] = con.execute(f"select * exclude (key) from {t} where key = ? order by {order}", [key]).fetchall()
        return out
    finally:
        con.close()


@pytest.fixture
def corpus(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    _write(pool / "1.jsonl", [_rec("Alpha doc.", id="a"), "{oops", _rec("Beta doc.", id="b"), _rec("alpha   DOC.")])
    _write(pool / "2.jsonl.zst", [_rec("Beta doc."), _rec("Gamma doc."), '{"text": 3}'], "zstd")
    tgt = tmp_path / "target"
    tgt.mkdir()
    (tgt / "t.txt").write_text("Alpha doc.")
    return tmp_path


def _run(corpus, store_name="store.duckdb", **kw):
    settings = IngestSettings(inputs=[str(corpus / "pool")], targets=[str(corpus / "target")], **kw)
    files = fingerprint_files(expand_inputs(settings.inputs))
    targets = fingerprint_files(expand_inputs(settings.targets))
    store = open_store(corpus / store_name)
    return ingest.fn(settings, files, targets, store), store


def test_task_writes_the_ingest_tables(corpus, caplog):
    with caplog.at_level(logging.WARNING):
        ref, store = _run(corpus)
    t = _tables(store.path, ref.key)
    f1, f2 = str((corpus / "pool" / "1.jsonl").resolve()), str((corpus / "pool" / "2.jsonl.zst").resolve())
    docs = [(r[0], r[1], r[4], r[8], r[9]) for r in t["ingest_docs"]]  # role, doc_idx, text, file, line
    assert docs == [
        ("pool", 0, "Alpha doc.", f1, 1), ("pool", 1, "Beta doc.", f1, 3), ("pool", 2, "Gamma doc.", f2, 2),
        ("target", 0, "Alpha doc.", str((corpus / "target" / "t.txt").resolve()), 1),  # dedup is per role
    ]
    assert [(r[1], r[2], r[3]) for r in t["ingest_quarantine"]] == [(f1, 2, "malformed_json"), (f2, 3, "wrong_type")]
    assert [(r[2], r[3], r[4], r[5]) for r in t["ingest_duplicates"]] == [(f1, 4, f1, 1), (f2, 1, f1, 3)]
    files = {r[1]: r for r in t["ingest_files"]}
    assert files[f1][4:] == (4, 2, 1, 1)  # records, ingested, quarantined, duplicates
    assert files[f2][4:] == (3, 1, 1, 1)
    assert files[f1][3] == hashlib.sha256((corpus / "pool" / "1.jsonl").read_bytes()).hexdigest()
    assert ref.stage == "ingest" and ref.rows == 4
    assert "malformed_json=1" in caplog.text and "wrong_type=1" in caplog.text


def test_task_rerun_is_idempotent_and_content_moves_the_key(corpus):
    ref1, store = _run(corpus)
    before = _tables(store.path, ref1.key)
    ref2, _ = _run(corpus)
    assert ref2 == ref1 and _tables(store.path, ref1.key) == before
    os.utime(corpus / "pool" / "1.jsonl")  # touching a file is not a change of content
    assert _run(corpus)[0].key == ref1.key
    _write(corpus / "pool" / "1.jsonl", [_rec("Delta doc.")])
    ref3, _ = _run(corpus)
    assert ref3.key != ref1.key and ref3.rows == 4
    assert _tables(store.path, ref1.key) == before  # the older partition is untouched


def test_doc_ids_are_stable_across_runs_and_file_moves(corpus, tmp_path):
    ref1, store1 = _run(corpus)
    moved = tmp_path / "elsewhere"
    shutil.copytree(corpus / "pool", moved / "pool")
    shutil.copytree(corpus / "target", moved / "target")
    ref2, store2 = _run(moved)
    ids1 = [(r[0], r[1], r[2]) for r in _tables(store1.path, ref1.key)["ingest_docs"]]
    ids2 = [(r[0], r[1], r[2]) for r in _tables(store2.path, ref2.key)["ingest_docs"]]
    assert ids1 == ids2 and ids1[0][2] == content_hash("Alpha doc.")


def test_task_fails_cleanly_on_a_file_changed_after_fingerprinting(corpus):
    settings = IngestSettings(inputs=[str(corpus / "pool")])
    files = fingerprint_files(expand_inputs(settings.inputs))
    (corpus / "pool" / "1.jsonl").write_text(_rec("changed meanwhile, longer than before") + "\n")
    store = open_store(corpus / "s.duckdb")
    with pytest.raises(InputError, match="1.jsonl.*changed"):
        ingest.fn(settings, files, (), store)
    con = duckdb.connect(store.path, read_only=True)
    assert con.execute("select count(*) from ingest_docs").fetchone() == (0,)  # rolled back
    con.close()


def test_task_with_a_broken_file_leaves_the_complete_partition_and_resumes_per_input(corpus):
    ref, store = _run(corpus)
    (corpus / "pool" / "3.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(InputError, match="3.jsonl.gz"):
        _run(corpus)
    con = duckdb.connect(store.path, read_only=True)
    # the earlier partition is untouched; the failed one is incomplete (no ingest_runs row), its
    # committed inputs are in the ledger, and no input of it is half written
    assert con.execute("select key from ingest_runs").fetchall() == [(ref.key,)]
    failed = con.execute("select distinct key from shard_done where stage = 'ingest' and key <> ?",
                         [ref.key]).fetchall()
    assert len(failed) == 1
    files = con.execute("select count(*) from ingest_files where key = ?", failed[0]).fetchone()[0]
    docs = con.execute("select count(*), count(distinct (role, doc_idx)) from ingest_docs where key = ?",
                       failed[0]).fetchone()
    assert files >= 1 and docs[0] == docs[1]  # the unchanged inputs copied from the base, each doc once
    con.close()
    with pytest.raises(InputError, match="3.jsonl.gz"):
        _run(corpus)  # the same inputs again: the committed ones are not read a second time
    con = duckdb.connect(store.path, read_only=True)
    assert con.execute("select count(*) from ingest_files where key = ?", failed[0]).fetchone()[0] == files
    assert con.execute("select count(*) from ingest_docs where key = ?", failed[0]).fetchone()[0] == docs[0]
    con.close()


def test_parquet_row_with_invalid_utf8_is_undecodable(tmp_path):
    offsets = pa.py_buffer(b"\x00\x00\x00\x00\x02\x00\x00\x00\x04\x00\x00\x00")
    text = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"ok\xff\xfe")])
    pq.write_table(pa.table({"text": text}), tmp_path / "u.parquet")
    good, bad, _ = _read(str(tmp_path / "u.parquet"))
    assert good["line"].to_list() == [1]
    assert bad.select("line", "reason").rows() == [(2, "undecodable")]


def _nested(depth: int) -> str:
    """A record whose `meta` field nests arrays so the record is `depth` levels deep (itself included)."""
    return '{"text": "Deep record.", "meta": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def test_records_nested_deeper_than_the_limit_are_quarantined_as_too_deep(tmp_path):
    # Records hundreds of levels deep parse, but json.dumps on them fails near the recursion limit: a JSONL
    # export of one ~975 deep raised RecursionError on every run. They are quarantined, the reason counted.
    limit = ing.MAX_DEPTH
    path = _write(tmp_path / "deep.jsonl", [_nested(600), _nested(limit), _nested(limit + 1),
                                            '{"text": "brackets [[[[ in text are not nesting' + "[" * 300 + '"}'])
    good, bad, records = _read(path)
    assert records == 4
    assert good["line"].to_list() == [2, 4]
    assert dict(zip(bad["line"].to_list(), bad["reason"].to_list())) == {1: "too_deep", 3: "too_deep"}
    assert str(limit) in bad["detail"][0] and bad["excerpt"][0].startswith('{"text": "Deep record."')
    # what is kept can be written back out as JSON
    assert json.loads(json.dumps(json.loads(good["fields"][0])))


def test_recursive_glob_does_not_follow_directory_symlink_loops(tmp_path):
    # Two links back up the tree made glob.glob(recursive=True) enumerate a/loop1/b/loop2/... without end.
    d = tmp_path / "d"
    (d / "a" / "b").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["one"]}), d / "x.parquet")
    pq.write_table(pa.table({"text": ["two"]}), d / "a" / "b" / "y.parquet")
    (d / "a" / "loop1").symlink_to(d)
    (d / "a" / "b" / "loop2").symlink_to(d / "a")
    (d / "a" / "linked.parquet").symlink_to(d / "x.parquet")  # a link to a file is still read
    import threading

    found: list = []
    worker = threading.Thread(target=lambda: found.append(expand_inputs([f"{d}/**/*.parquet"])), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "expand_inputs did not return: it follows the symlink loops"
    assert found[0] == sorted({(d / "x.parquet").resolve(), (d / "a" / "b" / "y.parquet").resolve()})
    assert expand_inputs([str(d)]) == found[0]  # a directory walk agrees


def test_task_refuses_a_pool_with_no_usable_document(corpus, tmp_path):
    # The text field no record has: every record is quarantined missing_text, and the error says which field.
    with pytest.raises(InputError, match=r"pool holds no usable document: all 7 records .*missing_text=6, malformed_json=1.*text field 'body'"):
        _run(corpus, text_field="body")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "nothing.jsonl").write_text("\n\n")
    settings = IngestSettings(inputs=[str(empty)])
    with pytest.raises(InputError, match="pool holds no document: .*nothing.jsonl.* hold no record"):
        ingest.fn(settings, fingerprint_files(expand_inputs(settings.inputs)), (), open_store(tmp_path / "e.duckdb"))


def test_task_refuses_only_missing_text_naming_the_text_field(tmp_path):
    pool = tmp_path / "p.jsonl"
    _write(pool, ['{"body": "Text under another name."}', '{"body": "More of it."}'])
    settings = IngestSettings(inputs=[str(pool)], text_field="content")
    with pytest.raises(InputError, match="no text field 'content': set --text-field"):
        ingest.fn(settings, fingerprint_files([pool]), (), open_store(tmp_path / "s.duckdb"))


def test_task_refuses_a_target_set_whose_every_record_is_bad(corpus):
    (corpus / "target" / "t.txt").unlink()
    _write(corpus / "target" / "t.jsonl", ['{"text": 1}', "{broken"])
    with pytest.raises(InputError, match=r"target set holds no usable document: .*t.jsonl.*wrong_type=1"):
        _run(corpus)
    with pytest.raises(InputError, match="target set"):  # and again when the partition is reused as is
        _run(corpus)

