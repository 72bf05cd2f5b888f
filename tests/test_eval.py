"""The benchmark's evaluation harness: KN trigram yardstick, task building, protocol checks, external DSIR."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.build_tasks import main as build_main
from benchmarks.build_tasks import parse_define
from benchmarks.eval.metrics import ProtocolError, check_protocol, evaluate_selection
from benchmarks.eval.ngram_lm import (
    BOS, EOS, FALLBACK_DISCOUNTS, UNK, KneserNeyTrigramLM, Vocab, modified_kn_discounts, trigram_events,
)
from benchmarks.eval.tasks import TaskSpec, build_tasks, load_task, pool_slice, read_jsonl, task_vocab

HAND = ["a b c", "a b d", "x b c"]


def fitted(texts, size=1000):
    return KneserNeyTrigramLM(Vocab.build(texts, size)).fit(texts)


# ----------------------------------------------------------------------------- tokens and events


def test_events_pad_each_line_and_skip_blank_lines():
    vocab = Vocab.build(["a b"])
    a, b = vocab.id("a"), vocab.id("b")
    u, v, w = trigram_events(*vocab.encode(["A b\n\n  \nb"]))
    assert list(zip(u, v, w)) == [(BOS, BOS, a), (BOS, a, b), (a, b, EOS), (BOS, BOS, b), (BOS, b, EOS)]


def test_vocab_is_top_words_ties_alphabetical_and_order_free():
    texts = ["b a c a", "d c e"]
    assert Vocab.build(texts, 3).words[3:] == ("a", "c", "b")
    assert Vocab.build(texts[::-1], 3) == Vocab.build(texts, 3)
    vocab = Vocab.build(texts, 3)
    ids, _ = vocab.encode(["a zebra ."])
    assert ids.tolist() == [vocab.id("a"), UNK, UNK]


def test_vocab_rejects_special_words():
    with pytest.raises(ValueError, match="<s>"):
        Vocab(["x", "<s>"])


# ----------------------------------------------------------------------------- smoothing


def test_kn_counts_match_hand_computation():
    lm = fitted(HAND)
    assert lm.count("a", "b", "c") == 1  # raw trigram count
    assert lm.count("b", "c") == 2  # continuation: distinct left words {a, x}
    assert lm.count("b", "d") == 1
    assert lm.count("a", "b") == 1  # only <s> precedes "a b"
    assert lm.count("<s>", "a") == 2  # starts with <s>: raw count (two sentences start with "a")
    assert lm.count("b") == 2  # {a, x} precede b
    assert lm.count("c") == 1  # only b precedes c
    assert lm.count("</s>") == 2  # {c, d}
    assert lm.count("a") == 1  # only <s>


def test_probability_matches_hand_computation():
    lm = fitted(HAND)
    assert all(lm.discount_fallback_.values())  # a 3-sentence corpus cannot estimate discounts
    d1, d2, _ = FALLBACK_DISCOUNTS
    n_pred = len(lm.vocab) - 1  # 8 ids minus <s>
    adjusted_unigrams = {"a": 1, "b": 2, "c": 1, "d": 1, "x": 1, "</s>": 2}
    total = sum(adjusted_unigrams.values())
    mass = sum(d1 if c == 1 else d2 for c in adjusted_unigrams.values())
    p1_c = (1 - d1) / total + mass / total / n_pred
    p2_c = (2 - d2) / 3 + (d2 + d1) / 3 * p1_c  # after "b": c has 2, d has 1
    p3_c = (1 - d1) / 2 + (2 * d1) / 2 * p2_c  # after "a b": c once, d once
    ids = [lm.vocab.id(x) for x in ("a", "b", "c")]
    assert lm.prob(*ids) == pytest.approx(p3_c, abs=1e-12)


@pytest.mark.parametrize("context", [("a", "b"), ("<s>", "<s>"), ("x", "b"), ("zzz", "b"), ("zzz", "yyy"), ("b", "c")])
def test_distribution_sums_to_one(context):
    p = fitted(HAND).distribution(*context)
    assert abs(p.sum() - 1.0) < 1e-9
    assert p[BOS] == 0 and np.all(p[np.arange(p.size) != BOS] > 0)


words = st.sampled_from(["the", "cat", "sat", "on", "mat", "a", "dog", ".", ","])


@settings(max_examples=25, deadline=None)
@given(
    lines=st.lists(st.lists(words, min_size=1, max_size=12).map(" ".join), min_size=1, max_size=40),
    context=st.tuples(words, words),
)
def test_distribution_sums_to_one_on_any_corpus(lines, context):
    lm = fitted(lines, size=6)  # some words fall out of the vocabulary
    assert abs(lm.distribution(*context).sum() - 1.0) < 1e-9


def test_estimated_discounts_follow_chen_goodman():
    counts = np.array([1] * 10 + [2] * 4 + [3] * 2 + [4] + [9] * 3)  # n1..n4 = 10, 4, 2, 1
    d, fallback = modified_kn_discounts(counts)
    y = 10 / (10 + 2 * 4)
    assert not fallback
    assert d == pytest.approx([1 - 2 * y * 4 / 10, 2 - 3 * y * 2 / 4, 3 - 4 * y * 1 / 2])
    assert modified_kn_discounts(np.array([1, 1, 2, 3]))[1]  # no count of 4: fallback


def test_training_text_scores_better_than_unrelated_text():
    train = ["the cat sat on the mat .", "the dog sat on the log .", "a cat and a dog ."] * 5
    other = ["sunt lacrimae rerum et mentem mortalia tangunt ."]
    vocab = Vocab.build(train + other)
    lm = KneserNeyTrigramLM(vocab).fit(train)
    assert lm.perplexity(train) < lm.perplexity(other)


def test_fit_is_deterministic():
    texts = ["one two three two one", "three two one", "four"] * 3
    vocab = Vocab.build(texts)
    a, b = KneserNeyTrigramLM(vocab).fit(texts), KneserNeyTrigramLM(vocab).fit(texts)
    u, v, w = np.meshgrid(*[np.arange(len(vocab))] * 3, indexing="ij")
    assert np.array_equal(a.prob(u, v, w), b.prob(u, v, w))


def test_empty_selection_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        KneserNeyTrigramLM(Vocab.build(HAND)).fit(["", "  \n"])


# ----------------------------------------------------------------------------- metrics


def test_in_domain_selection_has_lower_heldout_perplexity():
    cats = ["the cat sat on the mat", "a cat sat on a mat", "the cat ate the rat"]
    code = ["def f ( x ) : return x", "import os , sys", "for i in range ( n ) :"]
    held = ["the cat sat on the rat"]
    vocab = Vocab.build(cats + code)
    good = evaluate_selection(cats, held, vocab)
    bad = evaluate_selection(code, held, vocab)
    assert good["perplexity"] < bad["perplexity"]
    assert good["vocab_fingerprint"] == bad["vocab_fingerprint"] == vocab.fingerprint
    assert good["heldout_events"] == 7  # six words and </s>
    assert math.isclose(good["perplexity"], math.exp(good["cross_entropy"]))


def test_check_protocol_catches_leaks_and_unequal_budgets():
    held = ["h1", "h2"]
    dev = check_protocol({"quad": ["p1", "p2"], "dsir": ["p3"]}, held, {"quad": 1010, "dsir": 985}, 1000)
    assert dev == pytest.approx({"quad": 0.01, "dsir": -0.015})
    with pytest.raises(ProtocolError, match=r"quad: 1 selected ids .*'h2'"):
        check_protocol({"quad": ["p1", "h2"]}, held, {"quad": 1000}, 1000)
    with pytest.raises(ProtocolError, match=r"random: 950 tokens is -5.00% off"):
        check_protocol(["p1"], held, {"random": 950}, 1000)
    with pytest.raises(ProtocolError, match=r"\['topk'\]: no token count"):
        check_protocol({"topk": ["p1"]}, held, {}, 1000)


# ----------------------------------------------------------------------------- tasks

TOPICS = {
    "pydoc": "python function module import class return value list dict string".split(),
    "pgdoc": "table index query select column row transaction vacuum schema join".split(),
    "dict": "noun verb adjective meaning word sense usage plural archaic obsolete".split(),
}


def _write_source(path, docs_per_topic=30):
    rng = np.random.default_rng(7)
    lines = []
    for topic, vocab in TOPICS.items():
        for i in range(docs_per_topic):
            text = "\n".join(" ".join(rng.choice(vocab, size=rng.integers(6, 12))) + " ." for _ in range(4))
            lines.append({"id": f"{topic}:{i}", "source": topic, "lang": "en", "text": text})
    lines.append({"id": "mirror:0", "source": "mirror", "text": lines[0]["text"].upper()})  # same normalized text
    lines.append({"id": "pydoc:dup", "source": "pydoc", "text": lines[0]["text"]})  # exact dup in domain
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return lines


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.jsonl"
    return path, _write_source(path)


SPEC = TaskSpec("py", ("pydoc",), target_frac=0.25, heldout_frac=0.25)


def test_task_splits_are_disjoint_and_complete(tmp_path, source):
    path, records = source
    (meta,) = build_tasks(path, tmp_path / "tasks", [SPEC], seed=1)
    task = load_task(tmp_path / "tasks" / "py")
    pool_ids = [r["id"] for r in read_jsonl(task.pool_path)]
    target_ids = [r["id"] for r in task.target()]
    held_ids = task.heldout_ids()
    assert not set(pool_ids) & set(held_ids) and not set(pool_ids) & set(target_ids)
    assert not set(target_ids) & set(held_ids)
    assert {r["source"] for r in task.target()} == {"pydoc"} == {r["source"] for r in task.heldout()}
    c = meta["counts"]
    assert (c["pool_docs"], c["target_docs"], c["heldout_docs"]) == (len(pool_ids), len(target_ids), len(held_ids))
    assert c["pool_docs"] + c["target_docs"] + c["heldout_docs"] + c["removed_duplicates"] == len(records)
    assert c["pool_domain_docs"] == sum(i.startswith("pydoc:") for i in pool_ids) > 0
    assert meta["target_in_pool"] is False


def test_transfer_task_removes_the_whole_domain_from_the_pool(tmp_path, source):
    path, records = source
    spec = TaskSpec("py-transfer", ("pydoc",), target_frac=0.5, heldout_frac=0.5, transfer=True)
    (meta,) = build_tasks(path, tmp_path / "tasks", [spec], seed=1)
    task = load_task(tmp_path / "tasks" / "py-transfer")
    pool = list(read_jsonl(task.pool_path))
    assert not [r for r in pool if r["source"] == "pydoc"] and meta["counts"]["pool_domain_docs"] == 0
    assert "mirror:0" not in {r["id"] for r in pool}  # a copy of a domain text, from another source
    c = meta["counts"]
    assert c["target_docs"] + c["heldout_docs"] == len({r["text"] for r in records if r["source"] == "pydoc"})
    assert c["pool_docs"] == sum(r["source"] == t for r in records for t in ("pgdoc", "dict"))
    with pytest.raises(ValueError, match="sum to at most 1"):
        TaskSpec("bad", ("pydoc",), target_frac=0.6, heldout_frac=0.5, transfer=True)
    with pytest.raises(ValueError, match="leave part of the domain"):
        TaskSpec("bad", ("pydoc",), target_frac=0.5, heldout_frac=0.5)


def test_copies_of_heldout_text_leave_the_pool(tmp_path, source):
    path, _ = source
    # pydoc:0, pydoc:dup and mirror:0 hold one normalized text; seed 4 sends it to the held-out set
    (meta,) = build_tasks(path, tmp_path / "tasks", [SPEC], seed=4)
    task = load_task(tmp_path / "tasks" / "py")
    pool_ids = {r["id"] for r in read_jsonl(task.pool_path)}
    assert "pydoc:0" in task.heldout_ids() and "pydoc:dup" not in task.heldout_ids()  # one representative
    assert not {"pydoc:0", "pydoc:dup", "mirror:0"} & pool_ids
    assert meta["counts"]["removed_duplicates"] == 2


def test_task_build_is_deterministic_and_seeded(tmp_path, source):
    path, _ = source
    build_tasks(path, tmp_path / "a", [SPEC], seed=1)
    build_tasks(path, tmp_path / "b", [SPEC], seed=1)
    build_tasks(path, tmp_path / "c", [SPEC], seed=2)
    for f in ("pool.jsonl.zst", "target.jsonl", "heldout.jsonl"):
        assert (tmp_path / "a/py" / f).read_bytes() == (tmp_path / "b/py" / f).read_bytes()
    assert (tmp_path / "a/py/heldout.jsonl").read_bytes() != (tmp_path / "c/py/heldout.jsonl").read_bytes()


def test_built_task_is_reused_until_something_changes(tmp_path, source):
    path, _ = source
    out = tmp_path / "tasks"
    build_tasks(path, out, [SPEC], seed=1)
    stamp = (out / "py/pool.jsonl.zst").stat().st_mtime_ns
    build_tasks(path, out, [SPEC], seed=1)
    assert (out / "py/pool.jsonl.zst").stat().st_mtime_ns == stamp
    (out / "py/heldout.jsonl").write_text("")  # a damaged file is rebuilt
    build_tasks(path, out, [SPEC], seed=1)
    assert read_jsonl(out / "py/heldout.jsonl")
    build_tasks(path, out, [SPEC], seed=3)
    assert json.loads((out / "py/task.json").read_text())["seed"] == 3


def test_unknown_domain_is_named(tmp_path, source):
    path, _ = source
    with pytest.raises(ValueError, match="'nope'"):
        build_tasks(path, tmp_path / "t", [TaskSpec("nope", ("nope",))])


def test_cli_builds_a_defined_task(tmp_path, source, capsys):
    path, _ = source
    assert parse_define("pg=source:pgdoc,x") == TaskSpec("pg", ("pgdoc", "x"))
    assert build_main(["--source", str(path), "--out", str(tmp_path / "t"), "--define", "pg=source:pgdoc"]) == 0
    assert "pg: pool" in capsys.readouterr().out
    assert load_task(tmp_path / "t" / "pg").meta["counts"]["heldout_docs"] == 6


def test_task_vocab_is_fixed_by_the_task(tmp_path, source):
    path, _ = source
    build_tasks(path, tmp_path / "t", [SPEC], seed=1)
    task = load_task(tmp_path / "t" / "py")
    assert pool_slice(task.pool_path, 200, seed=1) == pool_slice(task.pool_path, 200, seed=1)
    assert 200 <= sum(len(t.split()) for t in pool_slice(task.pool_path, 200, seed=1)) < 300
    vocab = task_vocab(task, size=12, pool_tokens=100)
    assert vocab == task_vocab(task, size=12, pool_tokens=100) and len(vocab) == 15


# ----------------------------------------------------------------------------- external DSIR


def test_external_dsir_selects_in_domain_within_budget(tmp_path, source):
    pytest.importorskip("data_selection", reason="the published DSIR package (pip install data-selection)")
    from benchmarks.eval.dsir_external import dsir_select

    path, _ = source
    build_tasks(path, tmp_path / "t", [SPEC], seed=1)
    task = load_task(tmp_path / "t" / "py")
    state = np.random.get_state()
    kwargs = dict(seed=5, num_proc=1, num_buckets=512, min_example_length=5)
    first = dsir_select(task.pool_path, task.target_path, 300, **kwargs)
    again = dsir_select(task.pool_path, task.target_path, 300, **kwargs)
    assert np.array_equal(np.random.get_state()[1], state[1])  # the caller's global RNG is untouched
    assert first.ids == again.ids  # the package's Gumbel draw is seeded
    check_protocol({"dsir": first.ids}, task.heldout_ids(), {"dsir": first.tokens}, 300)
    assert first.tokens <= 300
    assert sum(i.startswith("pydoc:") for i in first.ids) >= 0.8 * len(first.ids)
    assert set(first.seconds) == {"stage", "fit", "weights", "resample"}
    # Worker processes too, after nltk's tokenizer has run in this process (nltk >= 3.10 pickling).
    two = dsir_select(task.pool_path, task.target_path, 300, **(kwargs | {"num_proc": 2}))
    assert 0.98 * 300 <= two.tokens <= 300 and sum(i.startswith("pydoc:") for i in two.ids) >= 0.8 * len(two.ids)


# ----------------------------------------------------------------------------- transformer second opinion

from dataclasses import replace  # noqa: E402

from benchmarks.eval import transformer_lm as tlm  # noqa: E402

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "data"
# 20k training bytes (40 steps of 8 x 64), 20k held-out bytes: well under a second per model on one core
TINY_LM = tlm.TransformerLMConfig(n_layers=1, d_model=32, n_heads=2, seq_len=64, batch_size=8, train_tokens=20_000,
                                  lr=3e-3, max_eval_tokens=20_000, threads=1)


@pytest.fixture(scope="module")
def example_texts():
    """Python docs (the shipped target sample) and out-of-domain pool text (dictionary entries, fortunes)."""
    pytest.importorskip("torch", reason=tlm.TORCH_HINT)
    target = [r["text"] for r in read_jsonl(EXAMPLES / "target.jsonl.zst")]
    pool = read_jsonl(EXAMPLES / "pool.jsonl.zst")
    return {"python": target[:100], "heldout": target[100:],
            "other": [r["text"] for r in pool if r["source"] in ("wordnet-3.0", "fortunes")]}


def test_transformer_is_deterministic_under_a_seed_and_leaves_the_global_rng(example_texts):
    import torch

    before = torch.get_rng_state()
    a = tlm.evaluate_transformer(example_texts["python"], example_texts["heldout"], TINY_LM, random_state=3)
    b = tlm.evaluate_transformer(example_texts["python"], example_texts["heldout"], TINY_LM, random_state=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert a["ppl_transformer"] == b["ppl_transformer"] and a["transformer_train_loss"] == b["transformer_train_loss"]
    assert a["transformer_device"] == "cpu" or torch.cuda.is_available()
    # the same number of training tokens whatever the selection's size: 40 steps x 8 windows x 64 bytes
    assert a["transformer_train_tokens"] == TINY_LM.steps * 8 * 64 == 20_480
    assert a["transformer_eval_tokens"] <= 20_000 and a["ppl_transformer_word"] > a["ppl_transformer"] > 1


def test_transformer_prefers_the_selection_from_the_target_domain(example_texts):
    held = tlm.encode_eval(example_texts["heldout"], TINY_LM)  # encoded once, scored by both models
    good = tlm.evaluate_transformer(example_texts["python"], held, TINY_LM)
    bad = tlm.evaluate_transformer(example_texts["other"], held, TINY_LM)
    assert good["ppl_transformer"] < bad["ppl_transformer"]
    assert good["transformer_train_tokens"] == bad["transformer_train_tokens"]  # same budget, different text


def test_transformer_refuses_an_empty_selection(example_texts):
    with pytest.raises(ValueError, match="empty"):
        tlm.TransformerLM(TINY_LM).fit(["", ""])


@settings(max_examples=30, deadline=None)
@given(texts=st.lists(st.text(alphabet="ab c\né", max_size=300), min_size=1, max_size=12),
       cap=st.integers(1, 2000), seed=st.integers(0, 3))
def test_capped_evaluation_is_a_seeded_sample_of_the_full_chunks(texts, cap, seed):
    full = tlm.encode_eval(texts, replace(TINY_LM, max_eval_tokens=None))
    capped = tlm.encode_eval(texts, replace(TINY_LM, max_eval_tokens=cap), random_state=seed)
    as_set = lambda e: sorted(c.tobytes() for c in e.chunks)  # noqa: E731
    assert full.tokens == sum(len(t.encode()) + 1 for t in texts)  # every byte and each EOS, once
    assert capped.chunks_total == len(full.chunks)
    assert set(as_set(capped)) <= set(as_set(full))  # whole chunks of the full evaluation, none made up
    assert capped.tokens <= max(cap, max(c.size - 1 for c in capped.chunks))  # at most one chunk over a tiny cap
    if full.tokens <= cap:
        assert as_set(capped) == as_set(full)
    again = tlm.encode_eval(texts, replace(TINY_LM, max_eval_tokens=cap), random_state=seed)
    assert as_set(again) == as_set(capped)


def test_plan_runs_on_a_gpu_only_when_asked_or_present(monkeypatch):
    off = tlm.plan_transformer("off")
    assert not off.run and off.reason == "skipped: --transformer off"
    if tlm.torch_available():
        auto = tlm.plan_transformer("auto", cuda_available=lambda: False)
        assert not auto.run and "no GPU" in auto.reason and "--transformer on" in auto.reason
        on = tlm.plan_transformer("on", cuda_available=lambda: False)
        assert (on.run, on.device) == (True, "cpu")
        assert tlm.plan_transformer("auto", cuda_available=lambda: True).device == "cuda"
    monkeypatch.setattr(tlm, "torch_available", lambda: False)
    assert "torch is not installed" in tlm.plan_transformer("auto").reason
    with pytest.raises(ValueError, match=r"--transformer on: .*pip install"):
        tlm.plan_transformer("on")
    with pytest.raises(ValueError, match="'sometimes'"):
        tlm.plan_transformer("sometimes")
