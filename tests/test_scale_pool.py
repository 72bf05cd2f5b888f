"""The scale-pool generator: parts and manifest, determinism, planted duplicates, resume after a kill."""

from __future__ import annotations

import io
import json
import random
import shutil
from collections import Counter

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.make_scale_pool import (
    EXACT_DUP, MANIFEST, NEAR_DUP, PERTURBED, DocumentPlanner, ScalePoolError, ScaleSpec, change_digits,
    edit_words, file_sha256, load_source, main, make_scale_pool, random_word, reorder_lines,
)
from quadflow.text import normalize
from tests.conftest import SAMPLE_POOL

SPEC = ScaleSpec(docs=20_000, docs_per_file=7_000, seed=1)
PARTS = ["part-00000.jsonl.zst", "part-00001.jsonl.zst", "part-00002.jsonl.zst"]


def _quiet(msg: str) -> None:
    pass


def _read(path) -> list[dict]:
    with open(path, "rb") as fh:
        return [json.loads(line) for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8")]


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale") / "pool"
    make_scale_pool(SAMPLE_POOL, out, SPEC, log=_quiet)
    return out


@pytest.fixture(scope="module")
def docs(pool_dir) -> list[dict]:
    return [doc for name in PARTS for doc in _read(pool_dir / name)]


@pytest.fixture(scope="module")
def planned():
    return DocumentPlanner(load_source(SAMPLE_POOL), SPEC).plan(np.arange(SPEC.docs))


def test_parts_and_manifest(pool_dir, docs):
    manifest = json.loads((pool_dir / MANIFEST).read_text())
    assert sorted(p.name for p in pool_dir.iterdir()) == [MANIFEST, *PARTS]  # no temp files left
    assert manifest["complete"] and manifest["params"]["docs"] == 20_000
    assert [f["docs"] for f in manifest["files"]] == [7_000, 7_000, 6_000]
    for entry in manifest["files"]:
        assert file_sha256(pool_dir / entry["name"]) == entry["sha256"]
        assert (pool_dir / entry["name"]).stat().st_size == entry["bytes"]
    assert manifest["source"]["sha256"] == file_sha256(SAMPLE_POOL) and manifest["source"]["docs"] == 4_260
    c = manifest["counts"]
    assert c["documents"] == len(docs) == 20_000
    assert c["perturbed"] + c["exact_duplicates"] + c["near_duplicates"] == 20_000
    assert all(sum(f["counts"][k] for f in manifest["files"]) == v for k, v in c.items())
    assert set(docs[0]) == {"id", "source", "domain", "lang", "title", "text"}
    assert len({d["id"] for d in docs}) == 20_000
    # lengths stay those of the source: mean chars per document within 10%
    assert abs(c["chars"] / c["documents"] / (manifest["source"]["chars"] / 4_260) - 1) < 0.10


def test_exact_duplicates_are_planted_at_the_rate(pool_dir, docs, planned):
    c = json.loads((pool_dir / MANIFEST).read_text())["counts"]
    assert abs(c["exact_duplicates"] - 0.05 * 20_000) < 5 * np.sqrt(20_000 * 0.05 * 0.95)
    exact = np.flatnonzero(planned["kind"] == EXACT_DUP)
    assert len(exact) == c["exact_duplicates"]
    targets = planned["target"][exact]
    assert (targets < exact).all()
    assert all(docs[i]["text"] == docs[t]["text"] for i, t in zip(exact.tolist(), targets.tolist()))
    assert c["duplicates_of_earlier_files"] > 0  # duplicates cross part boundaries
    seen, repeats = set(), 0
    for d in docs:
        repeats += d["text"] in seen
        seen.add(d["text"])
    assert c["exact_duplicates"] <= repeats <= 1.05 * c["exact_duplicates"]  # few accidental repeats


def test_near_duplicates_are_one_edit_from_an_earlier_document(docs, planned):
    near = np.flatnonzero(planned["kind"] == NEAR_DUP)
    assert abs(len(near) - 0.10 * 20_000) < 5 * np.sqrt(20_000 * 0.10 * 0.90)
    for i, t in zip(near.tolist(), planned["target"][near].tolist()):
        a, b = docs[i]["text"], docs[t]["text"]
        assert normalize(a) != normalize(b)  # exact dedup keeps both
        assert abs(len(a.split(" ")) - len(b.split(" "))) <= 1  # one word dropped, duplicated or swapped, or a digit


def test_perturbed_documents_differ_from_their_source(docs, planned):
    texts = load_source(SAMPLE_POOL).texts
    perturbed = np.flatnonzero(planned["kind"] == PERTURBED)[:3000]
    same = sum(normalize(docs[i]["text"]) == normalize(texts[s]) for i, s in zip(perturbed, planned["src"][perturbed]))
    assert same == 0


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, pool_dir):
    again = make_scale_pool(SAMPLE_POOL, tmp_path / "again", SPEC, log=_quiet)
    assert again == json.loads((pool_dir / MANIFEST).read_text())
    for name in PARTS:
        assert file_sha256(tmp_path / "again" / name) == file_sha256(pool_dir / name)
    make_scale_pool(SAMPLE_POOL, tmp_path / "other", ScaleSpec(docs=7_000, docs_per_file=7_000, seed=2), log=_quiet)
    assert file_sha256(tmp_path / "other" / PARTS[0]) != file_sha256(pool_dir / PARTS[0])
    other_texts = {d["text"] for d in _read(tmp_path / "other" / PARTS[0])}
    assert len(other_texts & {d["text"] for d in _read(pool_dir / PARTS[0])}) <= 7  # other documents, not a reshuffle


def test_smaller_pool_is_a_prefix_and_workers_do_not_change_bytes(tmp_path, pool_dir):
    spec = ScaleSpec(docs=10_000, docs_per_file=7_000, seed=1)
    manifest = make_scale_pool(SAMPLE_POOL, tmp_path / "small", spec, workers=2, log=_quiet)
    assert [f["docs"] for f in manifest["files"]] == [7_000, 3_000]
    assert file_sha256(tmp_path / "small" / PARTS[0]) == file_sha256(pool_dir / PARTS[0])
    assert _read(tmp_path / "small" / PARTS[1]) == _read(pool_dir / PARTS[1])[:3_000]


def test_rerun_skips_complete_parts_and_replaces_a_killed_one(tmp_path, pool_dir):
    out = tmp_path / "pool"
    shutil.copytree(pool_dir, out)
    mtimes = {name: (out / name).stat().st_mtime_ns for name in PARTS}
    assert main([str(SAMPLE_POOL), str(out), "--docs", "20000", "--docs-per-file", "7000", "--seed", "1"])["complete"]
    assert {name: (out / name).stat().st_mtime_ns for name in PARTS} == mtimes

    # A run killed while writing part 1: its manifest lacks part 1 and a half-written temp file is left.
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"] = [f for f in manifest["files"] if f["index"] != 1]
    manifest["complete"] = False
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / PARTS[1]).unlink()
    (out / f".{PARTS[1]}.tmp").write_bytes(b"\x28\xb5\x2f\xfd half a frame")
    # ... and part 2 was damaged after it was written: its sha256 no longer matches.
    (out / PARTS[2]).write_bytes((out / PARTS[2]).read_bytes()[:1000])

    redone = make_scale_pool(SAMPLE_POOL, out, SPEC, log=_quiet)
    assert redone["complete"] and sorted(p.name for p in out.iterdir()) == [MANIFEST, *PARTS]
    assert (out / PARTS[0]).stat().st_mtime_ns == mtimes[PARTS[0]]
    for name in PARTS:
        assert file_sha256(out / name) == file_sha256(pool_dir / name)
    assert redone["counts"] == json.loads((pool_dir / MANIFEST).read_text())["counts"]


def test_other_arguments_on_an_existing_pool_are_refused(tmp_path, pool_dir):
    out = tmp_path / "pool"
    shutil.copytree(pool_dir, out)
    with pytest.raises(ScalePoolError, match="different pool.*'seed'"):
        make_scale_pool(SAMPLE_POOL, out, ScaleSpec(docs=20_000, docs_per_file=7_000, seed=3), log=_quiet)


@pytest.mark.parametrize("kwargs, bad", [({"docs": 0}, "got 0"), ({"docs": 5, "dup_rate": 1.5}, "got 1.5"),
                                         ({"docs": 5, "dup_rate": 0.6, "near_dup_rate": 0.6}, "got 1.2")])
def test_spec_errors_quote_the_value(kwargs, bad):
    with pytest.raises(ScalePoolError, match=bad):
        ScaleSpec(**kwargs)


def test_load_source_reads_plain_jsonl_and_skips_bad_lines(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text('{"text": "a b", "domain": "d"}\nnot json\n{"text": ""}\n[1]\n\n{"text": "c d", "source": "s"}\n')
    pool = load_source(src)
    assert pool.texts == ["a b", "c d"] and pool.skipped == 3
    assert json.loads("{" + pool.meta[1] + "}") == {"source": "s", "domain": "s", "lang": "und", "title": ""}
    (tmp_path / "empty.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(ScalePoolError, match="no documents"):
        load_source(tmp_path / "empty.jsonl")


words = st.lists(st.sampled_from(["a", "A", "b", "x1", "", "\n", "end.\nNext", "\t"]), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(words=words, seed=st.integers(0, 2**32))
def test_one_word_edit_survives_normalization(words, seed):
    text = " ".join(words)
    edited = edit_words(text, random.Random(seed).random, 1)
    if normalize(text):
        assert normalize(edited) != normalize(text)
        assert abs(len(edited.split(" ")) - len(words)) <= 1
    else:
        assert edited == text  # nothing to edit in a blank text


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="ab 0189\n", min_size=1, max_size=40), seed=st.integers(0, 2**32))
def test_digit_and_line_edits_keep_the_rest(text, seed):
    rnd = random.Random(seed).random
    changed_text, changed = change_digits(text, rnd, 2)
    assert changed == any(ch.isdigit() for ch in text)
    diff = [i for i, (a, b) in enumerate(zip(text, changed_text)) if a != b]
    assert len(changed_text) == len(text) and len(diff) <= 2 and all(text[i].isdigit() for i in diff)
    assert Counter(reorder_lines(text, rnd).split("\n")) == Counter(text.split("\n"))


@settings(max_examples=200, deadline=None)
@given(donor=st.text(alphabet="ab \n", min_size=1, max_size=30), seed=st.integers(0, 2**32))
def test_random_word_is_a_whole_word_of_the_donor(donor, seed):
    word = random_word(donor, random.Random(seed).random)
    assert word in donor.split() if donor.split() else word == ""
