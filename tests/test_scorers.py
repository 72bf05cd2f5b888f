"""Scorer cores: heuristic rules on known texts, DSIR math, Gumbel top-k, classifier, combine."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse

from quadflow.settings import ConfigError, ScoreSettings
from quadflow.tasks.scorers import REGISTRY, ScoreInput, Scorer, Scores, get_scorer
from quadflow.tasks.scorers.classifier import (ClassifierScorer, HashedNgramClassifier, hashed_features, target_quantile,
                                              weighted_quantiles)
from quadflow.tasks.scorers.combine import combine, combined_version, percentile_ranks, resolve_weights
from quadflow.tasks.scorers.dsir import DSIR, DSIRScorer, gumbel_keys
from quadflow.tasks.scorers.heuristic import RULES, HeuristicScorer, apply_rules, heuristic_scores, text_stats

RULE_NAMES = {r.name for r in RULES}

CLEAN = (
    "The old harbour town sits at the mouth of a wide river, and its market has been held on the same "
    "square for more than three hundred years. Farmers bring apples, cheese and bread from the valleys "
    "to the north, while fishing boats unload their catch on the quay before dawn.\n"
    "Visitors often remark that the place feels quiet in winter. In summer, however, the streets fill "
    "with music, and the cafes stay open late into the evening.\n"
    "A small museum near the church tells the story of the shipyards that once employed half of the "
    "town. Its collection includes models, tools and letters written by sailors to their families."
)


def failed(text: str) -> set[str]:
    detail = heuristic_scores(pl.Series([text]))["detail"][0]
    return set(detail.split(",")) if detail else set()


# --------------------------------------------------------------------------------------------
# heuristic
# --------------------------------------------------------------------------------------------


def test_clean_english_paragraph_passes_every_rule():
    out = heuristic_scores(pl.Series([CLEAN]))
    assert out["detail"][0] == ""
    assert out["score"][0] == 1.0


def test_keyword_list_fails_line_and_prose_rules():
    text = "\n".join(f"keyword{i}" for i in range(80))
    assert {"fineweb_short_lines", "fineweb_line_punct", "gopher_stop_words", "c4_min_sentences",
            "fineweb_list_ratio"} <= failed(text)
    assert "gopher_word_count" not in failed(text)  # 80 words is enough words


def test_page_of_hash_symbols_fails_symbol_and_alpha_rules():
    text = CLEAN + "\n" + " ".join(["#"] * 60)
    assert {"gopher_hash_ratio", "gopher_alpha_words"} <= failed(text)


def test_repeated_lines_fail_repetition_rules():
    line = "Click here to subscribe to our newsletter for the best deals of the week."
    text = CLEAN + "\n" + "\n".join([line] * 12)
    assert {"gopher_dup_lines", "gopher_dup_line_chars"} <= failed(text)
    assert "gopher_dup_lines" not in failed(CLEAN)


def test_repeated_phrase_fails_top_ngram_rules():
    spam = " ".join(["buy cheap watches"] * 60) + ". " + CLEAN
    assert {"gopher_top_2gram", "gopher_top_3gram", "gopher_top_4gram"} <= failed(spam)
    # most frequent 2-gram: 'buy cheap' (9 chars) x 60; the last 'cheap watches' carries the period
    assert text_stats(pl.Series([spam]))["top_2gram_char_frac"][0] == pytest.approx(60 * 9 / len(spam))


def test_repeated_paragraphs_fail_paragraph_rules():
    para = "This paragraph is repeated. It says the same thing again and again, which is spam."
    text = "\n\n".join([CLEAN] + [para] * 6)
    assert {"gopher_dup_paragraphs", "gopher_dup_paragraph_chars"} <= failed(text)


def test_lorem_ipsum_and_curly_bracket_are_c4_failures():
    assert failed(CLEAN + " Lorem ipsum dolor sit amet.") == {"c4_lorem_ipsum"}
    assert failed(CLEAN + " Use {name} here.") == {"c4_curly_bracket"}


def test_word_count_and_sentence_minimums():
    assert {"gopher_word_count", "c4_min_sentences"} <= failed("The cat sat on the mat.")
    assert "gopher_word_count" not in failed(CLEAN)


def test_mean_word_length_bounds():
    assert "gopher_mean_word_length" in failed(" ".join(["a b c d e"] * 20) + ". the and. to of.")
    long_words = " ".join(["internationalization"] * 60)
    assert "gopher_mean_word_length" in failed(long_words)


def test_ellipsis_lines_and_bullets():
    ellipses = "\n".join(["and then the story goes on and on with the same kind of thing..."] * 2
                         + [f"line {i} that trails off and never ends..." for i in range(6)])
    assert {"gopher_ellipsis_lines"} <= failed(ellipses)
    bullets = "\n".join(f"• item number {i} of the list, with a few words to it." for i in range(20))
    assert "gopher_bullet_lines" in failed(bullets)
    dashes = "\n".join(f"-v{i} verbose output" for i in range(20))  # options, not bullets
    assert "gopher_bullet_lines" not in failed(dashes)


def test_empty_and_null_texts_score_low_without_errors():
    out = heuristic_scores(pl.Series(["", None, "   \n\n  "], dtype=pl.String))
    assert out.height == 3
    assert (out["score"] < 0.8).all()
    assert all("gopher_word_count" in d for d in out["detail"])


def test_stats_are_per_document_with_documented_definitions():
    stats = text_stats(pl.Series(["a bb ccc\n\nx\nx", "one"]))
    assert stats["n_words"].to_list() == [5, 1]
    assert stats["mean_word_length"][0] == pytest.approx(8 / 5)
    assert stats["n_lines"][0] == 3 and stats["lines_dup"][0] == 1  # empty line dropped, 'x' repeats once
    assert stats["n_paras"][0] == 2
    # top 2-gram: 'x x' occurs once only -> repeated n-grams only, so 0
    assert stats["top_2gram_char_frac"][0] == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab #.\n…{}xyz")), max_size=60), min_size=1, max_size=8))
def test_score_is_fraction_of_rules_passed_and_detail_names_the_failures(texts):
    out = heuristic_scores(pl.Series(texts, dtype=pl.String))
    for s, d in zip(out["score"], out["detail"]):
        names = [n for n in d.split(",") if n]
        assert set(names) <= RULE_NAMES
        assert s == pytest.approx(1 - len(names) / len(RULES))
        assert 0.0 <= s <= 1.0


def _reference_stats(text: str) -> dict[str, float]:
    """Plain-Python statement of the documented definitions, to check the vectorized ones."""
    words = text.split()
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    seen, dup, dup_chars = set(), 0, 0
    for ln in lines:
        if ln in seen:
            dup, dup_chars = dup + 1, dup_chars + len(ln)
        seen.add(ln)
    chars, n_lines = max(len(text), 1), max(len(lines), 1)
    out = {
        "n_words": len(words),
        "mean_word_length": sum(map(len, words)) / max(len(words), 1),
        "dup_line_frac": dup / n_lines,
        "dup_line_char_frac": dup_chars / chars,
        "short_line_frac": sum(len(ln) <= 30 for ln in lines) / n_lines,
        "line_punct_frac": sum(ln[-1] in ".!?\"'" for ln in lines) / n_lines,
    }
    for k in (2, 3, 4):
        grams = Counter(tuple(words[i:i + k]) for i in range(len(words) - k + 1))
        repeated = [(c, len(" ".join(g))) for g, c in grams.items() if c >= 2]
        c, length = max(repeated, default=(0, 0))
        out[f"top_{k}gram_char_frac"] = c * length / chars
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "bb", "the", " ", "  ", "\n", "\t", ".", "!", "x y"]), max_size=40)
                .map("".join), min_size=1, max_size=6))
def test_vectorized_stats_match_a_plain_python_reference(texts):
    stats = text_stats(pl.Series(texts, dtype=pl.String)).to_dicts()
    for text, got in zip(texts, stats):
        for name, want in _reference_stats(text).items():
            assert got[name] == pytest.approx(want), (name, text)


def test_batched_scorer_matches_one_batch():
    texts = pl.Series([CLEAN, "short", "\n".join(["dup line here"] * 5), CLEAN + " {x}"] * 5)
    one = heuristic_scores(texts)
    batched = HeuristicScorer(batch_chars=300).run(ScoreInput(n_docs=texts.len(), texts=texts))
    np.testing.assert_array_equal(batched.score, one["score"].to_numpy())
    assert batched.detail.to_list() == one["detail"].to_list()
    assert batched.params["failed"]["c4_curly_bracket"] == 5


def test_apply_rules_counts_only_given_rules():
    stats = text_stats(pl.Series([CLEAN + " {x}"]))
    curly = [r for r in RULES if r.name == "c4_curly_bracket"]
    out = apply_rules(stats, tuple(curly))
    assert out["score"][0] == 0.0 and out["detail"][0] == "c4_curly_bracket"


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


def test_registry_finds_every_configurable_scorer_with_a_version():
    for name in ("heuristic", "dsir", "classifier"):
        cls = get_scorer(name)
        assert cls.name == name and cls.VERSION.startswith(name)
    assert get_scorer("dsir").needs_target() and not get_scorer("heuristic").needs_target()
    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        get_scorer("nope")


def test_scorer_output_is_checked():
    class Broken(Scorer):
        name, VERSION = "broken", "broken-1"

        def score(self, data):
            return Scores(score=np.array([1.0, np.nan]))

    with pytest.raises(ValueError, match="non-finite score nan to doc 1"):
        Broken().run(ScoreInput(n_docs=2))
    with pytest.raises(ValueError, match="needs input 'texts'"):
        HeuristicScorer().run(ScoreInput(n_docs=2))
    assert "broken" not in REGISTRY


# --------------------------------------------------------------------------------------------
# DSIR
# --------------------------------------------------------------------------------------------


def test_dsir_log_weights_by_hand_on_three_buckets():
    target = sparse.csr_matrix(np.array([[2, 0, 0], [1, 1, 0]]))  # bucket sums 3, 1, 0
    raw = sparse.csr_matrix(np.array([[0, 0, 2], [1, 0, 1]]))  # bucket sums 1, 0, 3
    model = DSIR().fit(target, raw)
    # add-one: p_t = (4, 2, 1) / 7, p_r = (2, 1, 4) / 7
    np.testing.assert_allclose(model.log_ratio_, [math.log(2), math.log(2), math.log(1 / 4)])
    docs = sparse.csr_matrix(np.array([[1, 2, 0], [0, 0, 1], [0, 0, 0]]))
    np.testing.assert_allclose(model.log_weights(docs), [3 * math.log(2), math.log(1 / 4), 0.0])
    w = model.weights(docs)
    assert w.sum() == pytest.approx(1.0) and w.argmax() == 0
    kl = sum(p * math.log(p / q) for p, q in zip([4 / 7, 2 / 7, 1 / 7], [2 / 7, 1 / 7, 4 / 7]))
    assert model.kl_target_raw() == pytest.approx(kl)


def test_dsir_scorer_ranks_target_like_docs_higher_per_ngram():
    # toy vocabulary: buckets 0-4 are "target words", 5-9 "other words"
    target = sparse.csr_matrix(np.array([[3, 2, 1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 2, 2, 1, 0, 0, 0, 0, 1]]))
    pool = sparse.csr_matrix(np.array([
        [2, 2, 1, 1, 0, 0, 0, 0, 0, 0],          # target-like, short
        [0, 0, 0, 0, 0, 3, 3, 2, 2, 1],          # other
        [20, 20, 10, 10, 0, 1, 0, 0, 0, 0],      # target-like, long
        [1, 0, 0, 0, 0, 20, 20, 20, 20, 20],     # other, long
        [0] * 10,                                # no n-grams
    ]))
    out = DSIRScorer().run(ScoreInput(n_docs=5, ngrams=pool, target_ngrams=target))
    s = out.score
    assert min(s[0], s[2]) > max(s[1], s[3])
    assert s[4] == 0.0 and out.params["docs_without_ngrams"] == 1
    # per-n-gram normalization: the long target-like doc is not rewarded for its length alone
    lw = DSIR().fit(target, pool).log_weights(pool)
    assert lw[2] > 5 * lw[0] and s[2] < 2 * s[0]


def test_dsir_rejects_mismatched_spaces_and_unfitted_use():
    with pytest.raises(ValueError, match="target has 3 buckets, raw has 4"):
        DSIR().fit(sparse.csr_matrix((1, 3)), sparse.csr_matrix((1, 4)))
    with pytest.raises(ValueError, match="not fitted"):
        DSIR().log_weights(sparse.csr_matrix((1, 3)))
    with pytest.raises(ValueError, match="smoothing must be > 0"):
        DSIR(smoothing=0).fit(sparse.csr_matrix((1, 3)), sparse.csr_matrix((1, 3)))


def test_gumbel_keys_are_seeded():
    log_w = np.log(np.arange(1, 101, dtype=float))
    np.testing.assert_array_equal(gumbel_keys(log_w, 7), gumbel_keys(log_w, 7))
    assert not np.array_equal(gumbel_keys(log_w, 7), gumbel_keys(log_w, 8))
    model = DSIR()
    np.testing.assert_array_equal(model.resample(log_w, 10, 3), model.resample(log_w, 10, 3))


def test_resample_always_takes_an_overwhelmingly_heavy_item():
    log_w = np.array([0.0, 0.0, 1000.0, 0.0, 0.0])
    for seed in range(50):
        picked = DSIR().resample(log_w, 2, seed)
        assert picked[0] == 2 and len(set(picked)) == 2


def test_resample_frequencies_follow_the_weights():
    log_w = np.log([3.0, 1.0])
    first = np.array([DSIR().resample(log_w, 1, seed)[0] for seed in range(4000)])
    assert np.mean(first == 0) == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ValueError, match="k must be in \\[0, 2\\]"):
        DSIR().resample(log_w, 3, 0)


# --------------------------------------------------------------------------------------------
# classifier
# --------------------------------------------------------------------------------------------


def _toy_counts(seed: int = 0):
    """Target docs use buckets 0-9, other docs buckets 10-49; half the pool is target-like."""
    rng = np.random.default_rng(seed)

    def docs(n, lo, hi):
        m = np.zeros((n, 50))
        for row in m:
            np.add.at(row, rng.integers(lo, hi, size=30), 1)
        return m

    target = docs(30, 0, 10)
    pool = np.vstack([docs(100, 0, 12), docs(100, 10, 50)])
    return sparse.csr_matrix(target), sparse.csr_matrix(pool)


def test_hashed_features_are_log1p_and_unit_length():
    x = hashed_features(sparse.csr_matrix(np.array([[0, 3, 4], [0, 0, 0]])))
    row = np.log1p([0, 3, 4])
    np.testing.assert_allclose(x.toarray()[0], row / np.linalg.norm(row))
    assert x[1].nnz == 0


def test_classifier_ranks_target_like_above_random_and_is_seeded():
    target, pool = _toy_counts()
    tokens = np.asarray(pool.sum(axis=1)).ravel().astype(np.int64)
    data = ScoreInput(n_docs=200, ngrams=pool, target_ngrams=target, tokens=tokens)
    out = ClassifierScorer(random_state=3, negatives=150).run(data)
    like, other = out.score[:100], out.score[100:]
    assert np.mean(like[:, None] > other[None, :]) > 0.95  # AUC: target-like ranked above random
    again = ClassifierScorer(random_state=3, negatives=150).run(data)
    np.testing.assert_array_equal(out.score, again.score)
    p = out.params
    assert p["positives"] == 30 and p["negatives"] == 150 and p["folds"] == 5 and p["negatives_by"] == "tokens"
    assert p["held_out_accuracy"] >= 0.8
    q = p["target_quantiles"]
    assert len(q) == 101 and q == sorted(q)  # token-weighted quantiles 0.00 .. 1.00 of out-of-fold target scores
    # out-of-fold target scores sit above the rest of the pool (the toy's target-like pool half strays
    # into buckets 10-11, so it scores between the two)
    assert np.median(other) < target_quantile(p, 0.25) <= target_quantile(p, 0.5)
    assert np.median(other) < np.median(like) < target_quantile(p, 0.5)


def test_classifier_negatives_come_by_tokens_capped_by_the_pool_and_from_settings():
    target, pool = _toy_counts()
    settings = ScoreSettings(classifier_negative_docs=10, classifier_negatives_by="documents")
    scorer = ClassifierScorer.from_settings(settings, random_state=0)
    assert (scorer.negatives, scorer.negatives_by) == (10, "documents")
    model = HashedNgramClassifier(negatives=1000, negatives_by="documents", random_state=0).fit(target, pool)
    assert model.n_negative_ == 200 and np.array_equal(model.negative_idx_, np.arange(200))
    # by tokens: a document's chance is its share of the pool's tokens; empty documents are never drawn
    tokens = np.r_[np.full(100, 1000), np.full(99, 1), 0]
    by_tokens = HashedNgramClassifier(negatives=60, random_state=0).fit(target, pool, tokens)
    assert by_tokens.n_negative_ == 60 and (by_tokens.negative_idx_ < 100).mean() > 0.9
    assert 199 not in by_tokens.negative_idx_
    with pytest.raises(ValueError, match="token count of each of the 200 pool documents"):
        HashedNgramClassifier(random_state=0).fit(target, pool)
    tiny = HashedNgramClassifier(negatives=5, negatives_by="documents", random_state=0).fit(target[:1], pool)
    assert tiny.held_out_accuracy_ is None and tiny.folds_ == 0 and len(tiny.target_quantiles_) == 101


def test_weighted_quantiles_count_each_value_by_its_weight():
    values = np.array([3.0, 1.0, 2.0])
    np.testing.assert_allclose(weighted_quantiles(values, np.array([1.0, 1.0, 1.0]), [0.0, 0.5, 1.0]), [1, 2, 3])
    # the long document (weight 8) holds most of the mass: most quantiles land on it
    np.testing.assert_allclose(weighted_quantiles(values, np.array([8.0, 1.0, 1.0]), [0.1, 0.25, 0.9]), [1, 3, 3])
    with pytest.raises(ValueError, match="positive sum"):
        weighted_quantiles(values, np.zeros(3), [0.5])


# --------------------------------------------------------------------------------------------
# combine
# --------------------------------------------------------------------------------------------


def test_percentile_ranks_average_ties_scaled_to_unit_interval():
    np.testing.assert_allclose(percentile_ranks(np.array([10.0, 20.0, 20.0, 40.0])), [0, 0.5, 0.5, 1])
    np.testing.assert_allclose(percentile_ranks(np.array([5.0, 5.0, 5.0])), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(percentile_ranks(np.array([1.0])), [0.5])


def test_combine_weighted_mean_by_hand():
    scores = {"heuristic": np.array([1.0, 2.0, 3.0]), "dsir": np.array([3.0, 2.0, 1.0])}
    np.testing.assert_allclose(combine(scores), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(combine(scores, {"dsir": 3.0}), [0.75, 0.5, 0.25])
    np.testing.assert_allclose(combine(scores, {"dsir": 0.0}), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(combine(scores, {"classifier": 9.0}), [0.5, 0.5, 0.5])  # not chosen: ignored


def test_combine_rejects_all_zero_weights_and_ragged_input():
    with pytest.raises(ConfigError, match="weight 0"):
        resolve_weights(["heuristic"], {"heuristic": 0.0})
    with pytest.raises(ValueError, match="different numbers of documents"):
        combine({"a": np.zeros(2), "b": np.zeros(3)})
    assert combined_version({"heuristic": "heuristic-1", "dsir": "dsir-2"}) == "combined-1+heuristic-1+dsir-2"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=30), st.floats(0.1, 10))
def test_combine_is_in_unit_interval_and_invariant_to_monotone_rescaling(values, w):
    a = np.array(values)
    b = np.arange(a.size, dtype=float)[::-1]
    base = combine({"heuristic": a, "dsir": b}, {"heuristic": w})
    assert ((base >= 0) & (base <= 1)).all()
    rescaled = combine({"heuristic": a * 4.0, "dsir": b}, {"heuristic": w})  # exact, order-preserving
    np.testing.assert_allclose(base, rescaled, atol=1e-12)
