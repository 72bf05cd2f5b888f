"""Two-level Quad (select.blocks = 'ranked'): tiers, the novelty discount and the bandit, on small pools."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from quadflow.settings import SelectSettings
from quadflow.tasks.select import (LIKELY, OUTSIDE, RELATED, SURE, Novelty, NoveltyGains, Probe, TwoLevelQuad,
                                   array_pool, candidate_tiers, fill_budget, novelty_gain, quad_inputs, rank_prefix,
                                   run_selector)


def _kl(p_target: np.ndarray, counts: np.ndarray, prior: float, p_pool: np.ndarray) -> float:
    q = (counts + prior * p_pool) / (counts.sum() + prior)
    return float(np.sum(p_target * (np.log(p_target) - np.log(q))))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 12), st.floats(0.5, 50))
def test_novelty_gain_is_the_exact_drop_in_kl_per_token(seed, vocab, prior):
    rng = np.random.default_rng(seed)
    p_target = rng.dirichlet(np.ones(vocab))
    p_pool = rng.dirichlet(np.ones(vocab))
    selected = rng.integers(0, 20, vocab).astype(float)
    docs = rng.integers(0, 5, (4, vocab)).astype(float)
    docs[0] = 0  # an empty document gains nothing
    tokens = rng.integers(1, 30, 4)
    got = novelty_gain(sp.csr_matrix(docs), tokens, selected, p_target, p_pool, prior)
    before = _kl(p_target, selected, prior, p_pool)
    want = [(before - _kl(p_target, selected + d, prior, p_pool)) / t for d, t in zip(docs, tokens)]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 40), st.integers(1, 30))
def test_novelty_gains_of_candidate_rows_equal_novelty_gain_bit_for_bit(seed, vocab, n_docs):
    # the selector's per-round gains (precomputed table) must rank documents exactly as novelty_gain does
    rng = np.random.default_rng(seed)
    p_target = rng.dirichlet(np.ones(vocab))
    p_pool = rng.dirichlet(np.ones(vocab))
    dense = rng.integers(0, 4, (n_docs, vocab)).astype(float) * (rng.random((n_docs, vocab)) < 0.3)
    dense[rng.random((n_docs, vocab)) < 0.02] = 40.0  # counts above the table's range take the direct path
    dense[0] = 0.0
    counts = sp.csr_matrix(dense)
    tokens = rng.integers(1, 50, n_docs)
    # the store's float32 counts as they are, and a round summed a few stored counts at a time
    for gains in (NoveltyGains(counts, p_target), NoveltyGains(counts.astype(np.float32), p_target, chunk=5),
                  NoveltyGains(counts, p_target, chunk=1)):
        for selected in (np.zeros(vocab), rng.integers(0, 100, vocab).astype(float)):
            rows = np.sort(rng.choice(n_docs, size=rng.integers(1, n_docs + 1), replace=False))
            want = novelty_gain(counts[rows], tokens[rows], selected, p_target, p_pool, 7.5)
            got = gains(rows, tokens[rows], selected, p_pool, 7.5)
            assert np.array_equal(got, want)


def test_novelty_prefers_what_the_selection_lacks():
    p_target = np.array([0.5, 0.5])
    p_pool = np.array([0.5, 0.5])
    docs = sp.csr_matrix(np.array([[10.0, 0.0], [0.0, 10.0]]))
    tokens = np.array([10, 10])
    gain = novelty_gain(docs, tokens, np.array([100.0, 0.0]), p_target, p_pool, prior=1.0)
    assert gain[1] > 0 > gain[0]  # more of what is already there moves the selection away from the target


def test_tiers_split_candidates_by_the_target_scores():
    scores = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    tokens = np.array([10, 10, 10, 10, 10, 10, 60, 10, 10, 10])
    # budget 20, 4x -> candidates hold 80 tokens: docs 0..6 (the 7th crosses 80); doc 6 is over 0.5 x budget
    tier, info = candidate_tiers(scores, tokens, 20, multiple=4, theta=7.5, theta_likely=5.5, max_doc_share=0.5)
    assert tier.tolist() == [SURE, SURE, LIKELY, LIKELY, RELATED, RELATED, OUTSIDE, OUTSIDE, OUTSIDE, OUTSIDE]
    assert info["candidate_docs"] == 7 and info["target_kind_tokens"] == 20
    assert info["likely_target_kind_tokens"] == 20 and info["related_tokens"] == 20
    # the target's kind is never cut for length: a long document scoring like the target is SURE
    long_sure, _ = candidate_tiers(scores, tokens, 20, multiple=4, theta=2.5, theta_likely=2.5, max_doc_share=0.5)
    assert long_sure[6] == SURE
    # ... but one only likely of it is not a candidate when it is long: it would take 3x the budget on
    # an uncertain score (with it, one 107k-token document took 11% of encyclopedic's budget)
    long_likely, info = candidate_tiers(scores, tokens, 20, multiple=4, theta=7.5, theta_likely=2.5, max_doc_share=0.5)
    assert long_likely.tolist()[:7] == [SURE, SURE, LIKELY, LIKELY, LIKELY, LIKELY, OUTSIDE]
    assert info["likely_target_kind_tokens"] == 40
    plain, info = candidate_tiers(scores, tokens, 20, multiple=4, theta=None, theta_likely=None, max_doc_share=3.0)
    assert (plain[:7] == RELATED).all() and (plain[7:] == OUTSIDE).all() and info["theta"] is None


def _pool(seed=0, n_per=200, vocab=40):
    """Two sub-topics with disjoint n-grams; topic A scores a little higher than topic B, noise lower still."""
    rng = np.random.default_rng(seed)
    rows, topic = [], []
    for t, (lo, hi) in enumerate(((0, 10), (10, 20), (20, 40))):  # A, B, noise
        for _ in range(n_per):
            r = np.zeros(vocab)
            np.add.at(r, rng.integers(lo, hi, 30), 1)
            rows.append(r)
            topic.append(t)
    counts = sp.csr_matrix(np.array(rows))
    topic = np.array(topic)
    tokens = np.asarray(counts.sum(axis=1)).ravel().astype(np.int64)
    scores = np.where(topic == 0, 3.0, np.where(topic == 1, 2.0, -3.0)) + rng.normal(0, 0.1, topic.size)
    clusters = topic * 4 + rng.integers(0, 4, topic.size)  # 12 clusters, 4 per topic
    target = np.zeros(vocab)
    target[:20] = 1.0  # the target uses A's and B's n-grams alike
    novelty = Novelty(target_totals=target * 1000, pool_totals=np.asarray(counts.sum(axis=0)).ravel(),
                      rows=lambda idx: counts[idx])
    return counts, topic, tokens, scores, clusters, novelty


def test_diversity_covers_both_halves_of_a_broad_target_where_rank_order_takes_one():
    _, topic, tokens, scores, clusters, novelty = _pool()
    budget = int(tokens[topic == 0].sum() * 0.6)  # less than either topic holds
    share = {}
    for diversity in (True, False):
        q = TwoLevelQuad(arms_per_round=12, probes=3, rounds=20, candidate_multiple=4, diversity=diversity,
                         random_state=0).fit(clusters, tokens, budget, scores, Probe.lookup(scores), novelty)
        chosen = q.selected_
        assert tokens[chosen].sum() <= budget and tokens[chosen].sum() >= 0.98 * budget
        assert np.unique(chosen).size == chosen.size
        share[diversity] = tokens[chosen][topic[chosen] == 1].sum() / tokens[chosen].sum()
        assert (topic[chosen] != 2).all()  # noise never gets in
    assert share[True] > 0.35 and share[False] < 0.05


def test_documents_of_the_target_kind_all_go_in_when_they_fit():
    _, topic, tokens, scores, clusters, novelty = _pool()
    budget = int(tokens[topic <= 1].sum() * 1.2)  # room for every A and B document
    q = TwoLevelQuad(rounds=10, random_state=0).fit(
        clusters, tokens, budget, scores, Probe.lookup(scores), novelty, theta=1.5, theta_likely=1.0)
    chosen = set(q.selected_.tolist())
    assert set(np.flatnonzero(topic <= 1).tolist()) <= chosen
    reasons = dict(zip(q.selected_.tolist(), q.reasons_.tolist()))
    assert {reasons[i] for i in np.flatnonzero(topic <= 1)} == {"quad_target_kind"}
    assert {reasons[i] for i in chosen if topic[i] == 2} <= {"quad_related", "quad_fill"}
    assert q.tiers_["target_kind_tokens"] == tokens[topic <= 1].sum()


def test_an_on_demand_probe_rejects_a_bad_cluster_and_scores_only_what_it_probes():
    _, topic, tokens, scores, clusters, novelty = _pool()
    budget = int(tokens[topic == 0].sum() * 0.5)
    bad = 0  # the probe scorer (think: influence) finds cluster 0's documents harmful
    calls = []

    def influence(idx):
        calls.append(idx.size)
        return np.where(clusters[idx] == bad, -5.0, 1.0) + 0.01 * scores[idx]

    probe = Probe(influence, tokens.size)
    q = TwoLevelQuad(arms_per_round=12, probes=4, rounds=10, candidate_multiple=4, tau_quantile=0.1,
                     random_state=1).fit(clusters, tokens, budget, scores, probe, novelty, probe_is_rank=False)
    picked = q.selected_[q.reasons_ != "quad_fill"]
    assert picked.size and not (clusters[picked] == bad).any()
    rejected = q.rounds_.filter(~q.rounds_["accepted"])
    assert set(rejected["cluster"].to_list()) == {bad}
    assert 0 < probe.docs_scored_ < tokens.size  # probes only
    # by default an on-demand probe rejects blocks under the median calibration mean (the rank score's
    # lookups pass every candidate block): stricter, and still deterministic under the seed
    strict = [TwoLevelQuad(arms_per_round=12, probes=4, rounds=10, candidate_multiple=4, random_state=1).fit(
        clusters, tokens, budget, scores, Probe(influence, tokens.size), novelty, probe_is_rank=False)
        for _ in range(2)]
    assert strict[0].tau_quantile_ == 0.5 and not (clusters[strict[0].selected_] == bad).any()
    assert (~strict[0].rounds_["accepted"]).sum() > rejected.height
    np.testing.assert_array_equal(strict[0].selected_, strict[1].selected_)


def test_rounds_spread_the_budget_and_b_arms_are_pulled_at_most():
    _, topic, tokens, scores, clusters, novelty = _pool()
    budget = int(tokens.sum() * 0.3)
    reported = []
    q = TwoLevelQuad(arms_per_round=2, probes=2, rounds=8, candidate_multiple=2, random_state=0).fit(
        clusters, tokens, budget, scores, Probe.lookup(scores), novelty, progress=reported.append)
    per_round = q.rounds_.group_by("round").len()["len"]
    # progress hears of every round, with the tokens that round accepted
    assert len(reported) == q.n_rounds_ and sum(reported) == q.rounds_["tokens_accepted"].sum() > 0
    assert per_round.max() <= 2 and q.n_rounds_ >= 8
    assert q.probes_.filter(q.probes_["round"] == 0)["cluster"].n_unique() == q.arms_.filter(
        q.arms_["size"] > 0).height  # round 0 probes every arm that has candidates
    assert q.tokens_selected_ == tokens[q.selected_].sum() <= budget


def test_bad_parameters_and_inputs_are_named():
    _, _, tokens, scores, clusters, novelty = _pool()
    with pytest.raises(ValueError, match="candidate_multiple must be >= 1, got 0.5"):
        TwoLevelQuad(candidate_multiple=0.5).fit(clusters, tokens, 100, scores, Probe.lookup(scores), novelty)
    bad = scores.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="rank score of doc 3 is nan"):
        TwoLevelQuad().fit(clusters, tokens, 100, bad, Probe.lookup(scores), novelty)
    with pytest.raises(ValueError, match="needs rank_scores and novelty"):
        run_selector(SelectSettings(budget_tokens=100), 0, tokens, clusters, scores=scores)


def test_quad_inputs_resolve_auto_scorers():
    pool = {"classifier": np.array([1.0, 2.0]), "combined": np.array([0.1, 0.2]), "dsir": np.array([5.0, 1.0])}
    params = {"target_quantiles": list(np.linspace(0, 1, 101))}
    novelty = Novelty(np.ones(2), np.ones(2), lambda idx: sp.csr_matrix((len(idx), 2)))
    got, kwargs = quad_inputs(SelectSettings(), ran=lambda name: name in pool, pool_scores=pool.__getitem__,
                              classifier_params=lambda: params, novelty=lambda: novelty)
    assert (got.rank_scorer, got.probe_scorer) == ("classifier", "classifier")
    assert kwargs["theta"] == pytest.approx(0.25) and kwargs["theta_likely"] == pytest.approx(0.02)
    assert "scores" not in kwargs  # probes look up the rank score
    got, kwargs = quad_inputs(SelectSettings(probe_scorer="dsir"), ran=lambda name: name != "classifier",
                              pool_scores=pool.__getitem__, classifier_params=lambda: None, novelty=lambda: novelty)
    assert (got.rank_scorer, got.probe_scorer) == ("combined", "dsir") and "theta" not in kwargs
    assert "theta_likely" not in kwargs
    assert kwargs["scores"] is pool["dsir"]
    got, kwargs = quad_inputs(SelectSettings(blocks="random"), ran=lambda name: True, pool_scores=pool.__getitem__,
                              classifier_params=lambda: params, novelty=lambda: novelty)
    assert got.probe_scorer == "combined" and set(kwargs) == {"scores"}


def _tied_pool(rng, n):
    """Token counts with zeros and rank scores with many ties: the cases a cut by tokens can get wrong."""
    tokens = rng.integers(0, 40, n) * (rng.random(n) > 0.1)
    rank = rng.integers(0, 8, n) / 4.0
    return tokens.astype(np.int64), rank


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 120), st.integers(1, 50), st.floats(0, 800),
       st.booleans(), st.one_of(st.none(), st.integers(0, 40)))
def test_the_head_of_a_scanned_pool_is_the_head_of_one_sort(seed, n, batch, limit, cut_after, max_tokens):
    # the select stage keeps only the head of the pool by rank score while it scans the pool in batches: it
    # must be the head one sort of the whole pool gives, whatever the batches, ties and zero-token documents
    rng = np.random.default_rng(seed)
    tokens, rank = _tied_pool(rng, n)
    clusters = rng.integers(0, 5, n)
    order = np.lexsort((np.arange(n), -rank))
    after = None
    if cut_after:
        at = order[rng.integers(0, n)]
        after = (float(rank[at]), int(at))
        order = order[np.flatnonzero(order == at)[0] + 1:]  # only documents ranked after `after` count
    if max_tokens is not None:
        order = order[tokens[order] <= max_tokens]
    cum = np.cumsum(tokens[order])
    want = order[: int(np.searchsorted(cum, limit, side="left")) + 1] if cum.size and cum[-1] >= limit else order
    got = rank_prefix(array_pool(tokens, clusters, rank, batch_docs=batch), limit, after, max_tokens)
    assert got.docs.doc_idx.tolist() == want.tolist()
    assert (got.docs.tokens == tokens[want]).all() and (got.docs.clusters == clusters[want]).all()
    assert got.n_docs == n and got.labels.tolist() == np.unique(clusters).tolist()
    if got.cut is not None:
        assert got.cut == (float(rank[want[-1]]), int(want[-1])) and tokens[want].sum() >= limit


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(20, 150), st.integers(1, 40), st.integers(1, 3),
       st.floats(1.0, 2.5), st.floats(0.05, 0.9))
def test_the_fill_walks_the_whole_pool_by_rank_with_rejected_blocks_last(seed, n, batch, max_rounds, multiple,
                                                                        share):
    # a short bandit run leaves most of the budget to the fill, which walks past the candidates the scan kept
    # (scanning the pool again): it must take exactly what one walk of the whole pool by rank score takes,
    # with the documents of rejected blocks last, and in any batches
    rng = np.random.default_rng(seed)
    tokens, rank = _tied_pool(rng, n)
    clusters = rng.integers(0, 6, n)
    harm = rng.random(n)
    budget = max(1, int(share * tokens.sum()))
    novelty = Novelty(np.ones(4), np.ones(4), lambda idx: sp.csr_matrix(np.ones((len(idx), 4))))
    fits = []
    for batch_docs in (None, batch):
        q = TwoLevelQuad(arms_per_round=2, probes=2, rounds=4, max_rounds=max_rounds, candidate_multiple=multiple,
                         random_state=seed)
        fits.append(q.fit_pool(array_pool(tokens, clusters, rank, batch_docs), budget, novelty,
                               Probe(lambda idx: harm[idx], n), probe_is_rank=False))
    one, batched = fits
    for name in ("selected_", "selected_clusters_", "rounds_of_", "reasons_", "rejected_"):
        assert np.array_equal(getattr(one, name), getattr(batched, name)), name
    assert one.rounds_.equals(batched.rounds_) and one.probes_.equals(batched.probes_)
    assert one.arms_.equals(batched.arms_) and one.tiers_ == batched.tiers_

    by_rounds = one.selected_[one.rounds_of_ != -1]
    remaining = budget - int(tokens[by_rounds].sum())
    taken = np.zeros(n, dtype=bool)
    taken[by_rounds] = True
    rejected = np.zeros(n, dtype=bool)
    rejected[one.rejected_] = True
    order = np.lexsort((np.arange(n), -rank, rejected))
    want = []
    if remaining > 0 and budget - remaining < 0.999 * budget:
        want = fill_budget(order[~taken[order]], tokens, remaining).tolist()
    assert one.selected_[one.rounds_of_ == -1].tolist() == want
    assert (one.selected_clusters_ == clusters[one.selected_]).all()
    assert one.tokens_selected_ == tokens[one.selected_].sum() <= budget
