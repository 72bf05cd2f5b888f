"""The select core: budget filling, the baselines and the Quad bandit, with hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quadflow.tasks.select import (
    FILL_ROUND,
    QuadBandit,
    fill_budget,
    gumbel_keys,
    select_dsir,
    select_random,
    select_topk,
    ucb_scores,
)


def _lookup(scores):
    """A probe_fn over precomputed scores that records each (batched) call."""
    scores = np.asarray(scores, dtype=np.float64)
    calls: list[np.ndarray] = []

    def probe(idx):
        calls.append(np.asarray(idx).copy())
        return scores[idx]

    probe.calls = calls
    return probe


def _pool(n=20_000, k=40, seed=0):
    """Synthetic pool: skewed token counts, clusters of varying quality, noisy scores in (0, 1)."""
    rng = np.random.default_rng(seed)
    clusters = rng.integers(0, k, n)
    tokens = np.maximum(1, rng.lognormal(3.0, 1.2, n)).astype(np.int64)
    quality = rng.normal(0, 1.5, k)
    scores = 1 / (1 + np.exp(-(quality[clusters] + rng.normal(0, 1, n))))
    return clusters, tokens, scores


# ---------------------------------------------------------------- fill_budget


def test_fill_budget_skips_what_does_not_fit_and_keeps_walking():
    tokens = np.array([5, 3, 8, 1, 4])
    assert fill_budget(np.arange(5), tokens, 9).tolist() == [0, 1, 3]
    assert fill_budget(np.array([2, 4, 0]), tokens, 12).tolist() == [2, 4]
    assert fill_budget(np.arange(5), tokens, 0).tolist() == []
    assert fill_budget(np.arange(5), tokens, 100).tolist() == [0, 1, 2, 3, 4]


def test_fill_budget_takes_zero_token_docs_and_rejects_bad_input():
    assert fill_budget(np.arange(3), np.array([0, 7, 0]), 5).tolist() == [0, 2]
    with pytest.raises(ValueError, match="-2"):
        fill_budget(np.arange(2), np.array([1, -2]), 5)
    with pytest.raises(ValueError, match="-1"):
        fill_budget(np.arange(2), np.array([1, 2]), -1)


def _greedy_reference(order, tokens, budget):
    out, left = [], budget
    for i in order:
        if tokens[i] <= left:
            out.append(i)
            left -= tokens[i]
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=0, max_size=40), st.integers(0, 400), st.integers(0, 2**31))
def test_fill_budget_never_exceeds_budget_and_is_maximal_greedy(tok, budget, seed):
    tokens = np.array(tok, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(tokens.size)
    chosen = fill_budget(order, tokens, budget)
    assert tokens[chosen].sum() <= budget
    assert chosen.tolist() == _greedy_reference(order.tolist(), tok, budget)
    # Every skipped document did not fit when it was walked, so it does not fit now either.
    skipped = np.setdiff1d(order, chosen)
    assert (tokens[skipped] > budget - tokens[chosen].sum()).all()


# ---------------------------------------------------------------- baselines


def test_topk_orders_by_score_then_doc_idx():
    scores = np.array([0.5, 0.9, 0.5, np.nan, 0.9, 0.1])
    tokens = np.ones(6, dtype=np.int64)
    assert select_topk(scores, tokens, 6).tolist() == [1, 4, 0, 2, 5, 3]
    assert select_topk(scores, tokens, 3).tolist() == [1, 4, 0]


def test_random_is_seeded():
    tokens = np.full(1000, 3)
    a, b, c = (select_random(tokens, 300, s) for s in (1, 1, 2))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert a.size == 100


def test_dsir_gumbel_is_seeded_and_follows_the_weights():
    log_w = np.zeros(1000)
    log_w[:10] = 10.0  # e^10 times more likely than the rest
    tokens = np.ones(1000, dtype=np.int64)
    a, b, c = (select_dsir(log_w, tokens, 10, s) for s in (3, 3, 4))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert np.isin(a, np.arange(10)).sum() >= 8
    # The order is the Gumbel keys' order (descending).
    keys = gumbel_keys(log_w, 3)
    assert a.tolist() == np.argsort(-keys, kind="stable")[:10].tolist()
    assert np.array_equal(gumbel_keys(log_w, 3), gumbel_keys(log_w, 3))


def test_dsir_draws_documents_below_min_tokens_only_after_every_longer_one():
    rng = np.random.default_rng(0)
    log_w = rng.normal(size=2000)
    log_w[:100] = 20.0  # the likeliest documents are the short ones
    tokens = np.where(np.arange(2000) < 100, 5, 50).astype(np.int64)
    chosen = select_dsir(log_w, tokens, 5000, 7, min_tokens=50)
    assert chosen.size == 100 and (tokens[chosen] >= 50).all()
    # The long documents come in the order they would have without the floor.
    everything = select_dsir(log_w, tokens, int(tokens.sum()), 7)
    assert chosen.tolist() == everything[tokens[everything] >= 50][:100].tolist()
    # Too few long documents: every one of them first, then the short ones in their keys' order.
    more = select_dsir(log_w, tokens, 1900 * 50 + 25, 7, min_tokens=50)
    assert (tokens[more[:1900]] == 50).all() and more[1900:].tolist() == everything[tokens[everything] < 50][:5].tolist()
    with pytest.raises(ValueError, match="min_tokens"):
        select_dsir(log_w, tokens, 100, 7, min_tokens=-1)


@pytest.mark.parametrize("selector", ["random", "topk", "dsir"])
def test_baselines_fill_the_budget_on_a_large_pool(selector):
    clusters, tokens, scores = _pool()
    budget = int(tokens.sum() * 0.1)
    chosen = {"random": lambda: select_random(tokens, budget, 0),
              "topk": lambda: select_topk(scores, tokens, budget),
              "dsir": lambda: select_dsir(np.log(scores), tokens, budget, 0)}[selector]()
    assert 0.98 * budget <= tokens[chosen].sum() <= budget
    assert np.unique(chosen).size == chosen.size


# ---------------------------------------------------------------- UCB arithmetic


def test_ucb_scores_by_hand():
    # 3 arms after N = 4 pulls: R = (0.6, -0.2, 0), T = (2, 1, 0).
    got = ucb_scores(np.array([0.6, -0.2, 0.0]), np.array([2.0, 1.0, 0.0]), 4, alpha=0.5)
    ln4 = math.log(4)
    want = [0.3 + 0.5 * math.sqrt(2 * ln4 / 3), -0.2 + 0.5 * math.sqrt(2 * ln4 / 2),
            0.0 + 0.5 * math.sqrt(2 * ln4 / 1)]
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    # N = 0 counts as 1: no exploration bonus before the first pull.
    assert ucb_scores(np.zeros(3), np.zeros(3), 0, alpha=1.0).tolist() == [0.0, 0.0, 0.0]


def _three_arms(**params):
    """Arms 0/1/2 of 4 docs, 10 tokens each, scoring 0.9/0.6/0.1; arms 0 and 1 are neighbours."""
    clusters = np.repeat([0, 1, 2], 4)
    tokens = np.full(12, 10)
    scores = np.repeat([0.9, 0.6, 0.1], 4)
    neighbors = pl.DataFrame({
        "cluster": [0, 1, 0, 2, 7], "neighbor": [1, 0, 2, 0, 1],
        # 0 <-> 1 at d = 0.1 (weight 1 - 0.1/0.2 = 0.5); 0 <-> 2 beyond gamma; 7 is not a cluster.
        "distance": [0.1, 0.1, 0.3, 0.3, 0.05],
    })
    probe = _lookup(scores)
    kw = dict(arms_per_round=3, probes=2, block_docs=2, max_rounds=2, tau=0.5, alpha=1.0, random_state=0)
    kw.update(params)
    bandit = QuadBandit(**kw).fit(clusters, tokens, 1000, probe, neighbors, gamma=0.2)
    return bandit, probe


def test_three_arm_rounds_by_hand():
    bandit, probe = _three_arms()
    r = bandit.rounds_
    # Round 1: N = 0 -> every UCB is 0; all three arms pulled. Rewards 0.9-0.5, 0.6-0.5, 0.1-0.5.
    r1 = r.filter(pl.col("round") == 1).sort("cluster")
    assert r1["ucb"].to_list() == [0.0, 0.0, 0.0]
    assert r1["reward"].to_list() == pytest.approx([0.4, 0.1, -0.4])
    assert r1["accepted"].to_list() == [True, True, False]
    assert r1["tokens_accepted"].to_list() == [20, 20, 0]
    # After round 1 (shared weight 0.5 between arms 0 and 1), N = 3:
    #   R = (0.4 + 0.5*0.1, 0.1 + 0.5*0.4, -0.4) = (0.45, 0.3, -0.4), T = (1.5, 1.5, 1).
    r2 = r.filter(pl.col("round") == 2)
    assert r2["cluster"].to_list() == [0, 1, 2]  # in UCB order
    ln3 = math.log(3)
    assert r2["ucb"].to_list() == pytest.approx([
        0.45 / 1.5 + math.sqrt(2 * ln3 / 2.5),
        0.3 / 1.5 + math.sqrt(2 * ln3 / 2.5),
        -0.4 + math.sqrt(2 * ln3 / 2),
    ], abs=1e-12)
    assert r2["block_start"].to_list() == [2, 2, 2]
    # Final state: R = (0.45 + 0.4 + 0.05, 0.3 + 0.1 + 0.2, -0.8), T = (3, 3, 2); all 4 docs walked.
    arms = bandit.arms_.sort("cluster")
    assert arms["reward_sum"].to_list() == pytest.approx([0.9, 0.6, -0.8], abs=1e-12)
    assert arms["pulls"].to_list() == pytest.approx([3.0, 3.0, 2.0])
    assert arms["direct_pulls"].to_list() == [2, 2, 2]
    assert arms["cursor"].to_list() == [4, 4, 4] and arms["exhausted"].all()
    # Arms 0 and 1 accepted both blocks; arm 2 none. Every arm is exhausted and the budget
    # (1000) exceeds the pool (120 tokens), so the rejected arm 2 fills last, marked quad_fill.
    block = bandit.reasons_ == "quad_block"
    assert sorted(bandit.selected_[block].tolist()) == list(range(8))
    assert sorted(bandit.selected_[~block].tolist()) == [8, 9, 10, 11]
    assert set(bandit.reasons_[~block]) == {"quad_fill"} and block[:8].all()
    assert bandit.stop_reason_ == "no_live_arms"
    assert bandit.n_rounds_ == 2 and bandit.n_probed_ == 12
    # Given tau and alpha: no calibration; one batched probe call per round.
    assert len(probe.calls) == 2 and [c.size for c in probe.calls] == [6, 6]
    assert (bandit.probes_["round"] >= 1).all()


def test_alpha_zero_exploits_the_best_arm_once_found():
    # Arm 0 scores 0.9, arms 1 and 2 score 0.1; tau 0.5. With alpha = 0, UCB is the mean reward,
    # so once arm 0 is pulled it stays on top until exhausted (10 blocks of 2).
    clusters = np.repeat([0, 1, 2], 20)
    scores = np.repeat([0.9, 0.1, 0.1], 20)
    bandit = QuadBandit(arms_per_round=1, probes=1, block_docs=2, max_rounds=14, tau=0.5, alpha=0.0,
                        random_state=5).fit(clusters, np.ones(60, dtype=np.int64), 10_000, _lookup(scores))
    pulled = bandit.rounds_.sort("round")["cluster"].to_list()
    first = pulled.index(0)
    assert first <= 2  # negative arms fall below the unpulled ones (UCB 0)
    assert pulled[first: first + 10] == [0] * 10
    assert set(pulled[:first]) <= {1, 2} and len(set(pulled[:first])) == first


# ---------------------------------------------------------------- probes, blocks, exhaustion


def test_probes_come_from_the_block_they_judge():
    clusters, tokens, scores = _pool(n=3000, k=12, seed=1)
    bandit = QuadBandit(arms_per_round=4, probes=5, block_docs=25, max_rounds=20, random_state=3).fit(
        clusters, tokens, 10**9, _lookup(scores))
    sel = pl.DataFrame({"doc_idx": bandit.selected_, "round": bandit.rounds_of_, "cluster": clusters[bandit.selected_]})
    probes = bandit.probes_.filter(pl.col("round") >= 1)
    seen_blocks: set[int] = set()
    for row in bandit.rounds_.iter_rows(named=True):
        p = probes.filter((pl.col("round") == row["round"]) & (pl.col("cluster") == row["cluster"]))
        assert p.height == 5 and (clusters[p["doc_idx"].to_numpy()] == row["cluster"]).all()
        assert p["score"].mean() == pytest.approx(row["mean_probe"])
        assert row["reward"] == pytest.approx(row["mean_probe"] - bandit.tau_)
        block = sel.filter((pl.col("round") == row["round"]) & (pl.col("cluster") == row["cluster"]))
        if row["accepted"]:
            # The accepted block is exactly the probed block: b docs (fewer at a cluster's end).
            assert block.height == row["block_docs"] <= 25
            assert set(p["doc_idx"].to_list()) <= set(block["doc_idx"].to_list())
        else:
            assert block.height == 0
        # Blocks of one cluster never overlap, so neither do their probes.
        assert seen_blocks.isdisjoint(p["doc_idx"].to_list())
        seen_blocks.update(p["doc_idx"].to_list())


def test_exhausted_arms_are_not_pulled():
    sizes = [1, 3, 5, 40]
    clusters = np.repeat(np.arange(4), sizes)
    scores = np.linspace(0.2, 0.8, clusters.size)
    bandit = QuadBandit(arms_per_round=4, probes=2, block_docs=2, max_rounds=100, tau=-1.0, alpha=0.1,
                        random_state=0).fit(clusters, np.ones(clusters.size, dtype=np.int64), 10**6, _lookup(scores))
    r = bandit.rounds_
    for c, size in enumerate(sizes):
        rc = r.filter(pl.col("cluster") == c).sort("round")
        assert rc.height == math.ceil(size / 2)
        assert rc["block_start"].to_list() == list(range(0, size, 2))
        assert rc["block_docs"].sum() == size
    # Round t pulls exactly the arms with documents left.
    per_round = r.group_by("round").len().sort("round")["len"].to_list()
    assert per_round == [4, 3, 2] + [1] * 17
    assert bandit.arms_["exhausted"].all() and bandit.stop_reason_ == "no_live_arms"
    assert sorted(bandit.selected_.tolist()) == list(range(clusters.size))


# ---------------------------------------------------------------- budget and fill


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 80), st.integers(1, 6), st.integers(0, 600), st.integers(1, 3), st.integers(1, 3),
       st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**31))
def test_bandit_never_exceeds_budget(n, k, budget, arms, m, b, rounds, seed):
    rng = np.random.default_rng(seed)
    clusters = rng.integers(0, k, n)
    tokens = rng.integers(0, 50, n)
    bandit = QuadBandit(arms_per_round=arms, probes=m, block_docs=b, max_rounds=rounds, calibration_blocks=4,
                        random_state=seed).fit(clusters, tokens, budget, _lookup(rng.random(n)))
    chosen = bandit.selected_
    assert tokens[chosen].sum() == bandit.tokens_selected_ <= budget
    assert np.unique(chosen).size == chosen.size
    assert len(bandit.reasons_) == len(bandit.rounds_of_) == chosen.size
    assert (bandit.rounds_["tokens_accepted"].sum() + tokens[chosen[bandit.rounds_of_ == FILL_ROUND]].sum()
            == tokens[chosen].sum())


@pytest.mark.parametrize("max_rounds", [200, 1])
def test_bandit_fills_the_budget_on_a_large_pool(max_rounds):
    clusters, tokens, scores = _pool()
    budget = int(tokens.sum() * 0.1)
    bandit = QuadBandit(max_rounds=max_rounds, random_state=0).fit(clusters, tokens, budget, _lookup(scores))
    assert 0.98 * budget <= bandit.tokens_selected_ <= budget
    if max_rounds == 1:
        assert bandit.stop_reason_ == "max_rounds" and "quad_fill" in set(bandit.reasons_)
    else:
        assert bandit.stop_reason_ == "budget_full" and set(bandit.reasons_) == {"quad_block"}


def test_fill_takes_unseen_docs_of_the_best_estimated_arms_first():
    clusters, tokens, scores = _pool(n=4000, k=10, seed=2)
    bandit = QuadBandit(arms_per_round=10, probes=5, block_docs=20, max_rounds=2, random_state=1).fit(
        clusters, tokens, int(tokens.sum() * 0.3), _lookup(scores))
    fill = bandit.selected_[bandit.rounds_of_ == FILL_ROUND]
    assert fill.size > 0 and (bandit.reasons_[bandit.rounds_of_ == FILL_ROUND] == "quad_fill").all()
    arms = bandit.arms_.with_columns(est=pl.col("reward_sum") / pl.col("pulls"))
    best = arms.sort("est", descending=True)["cluster"][0]
    assert clusters[fill[0]] == best
    # Documents of blocks the bandit walked past (accepted or rejected) are never filled.
    walked = set(bandit.probes_.filter(pl.col("round") >= 1)["doc_idx"].to_list())
    assert walked.isdisjoint(fill.tolist())


def test_budget_near_the_pool_size_is_still_filled_from_rejected_blocks_last():
    clusters, tokens, scores = _pool(n=4000, k=10, seed=3)
    budget = int(tokens.sum() * 0.95)
    # tau above every score: every block is rejected, so only the fill phase selects anything.
    bandit = QuadBandit(arms_per_round=10, probes=5, block_docs=50, max_rounds=100, tau=2.0, alpha=0.1,
                        random_state=0).fit(clusters, tokens, budget, _lookup(scores))
    assert 0.98 * budget <= bandit.tokens_selected_ <= budget
    assert set(bandit.reasons_) == {"quad_fill"}
    assert np.unique(bandit.selected_).size == bandit.selected_.size


def test_high_scoring_cluster_gets_more_accepted_blocks():
    rng = np.random.default_rng(4)
    clusters = np.repeat(np.arange(8), 200)
    base = np.array([0.9, 0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    scores = np.clip(base[clusters] + rng.normal(0, 0.1, clusters.size), 0, 1)
    bandit = QuadBandit(arms_per_round=2, probes=5, block_docs=20, max_rounds=30, random_state=0).fit(
        clusters, np.full(clusters.size, 10), 10**7, _lookup(scores))
    accepted = bandit.rounds_.filter(pl.col("accepted")).group_by("cluster").len()
    per = dict(zip(accepted["cluster"].to_list(), accepted["len"].to_list()))
    assert per.get(0, 0) >= 5 > per.get(1, 0)


# ---------------------------------------------------------------- calibration, determinism, errors


def test_auto_tau_alpha_and_block_docs_come_from_calibration():
    clusters, tokens, scores = _pool(n=4000, k=25, seed=5)
    probe = _lookup(scores)
    bandit = QuadBandit(probes=4, calibration_blocks=16, tau_quantile=0.75, max_rounds=3, random_state=2).fit(
        clusters, tokens, 5000, probe)
    calib = bandit.probes_.filter(pl.col("round") == 0)
    assert calib.height == 16 * 4 and calib["doc_idx"].n_unique() == 64
    means = calib["score"].to_numpy().reshape(16, 4).mean(axis=1)
    assert bandit.tau_ == pytest.approx(np.quantile(means, 0.75))
    assert bandit.alpha_ == pytest.approx(np.std(means))
    # A tight budget caps b at budget / (10 rounds * B * mean doc tokens), but never below m.
    assert 5000 / (10 * 50 * tokens.mean()) < 1 and bandit.block_docs_ == 4
    assert probe.calls[0].tolist() == calib["doc_idx"].to_list()  # calibration is one batched call
    assert len(probe.calls) == 1 + bandit.n_rounds_
    # A roomy budget leaves b at an eighth of the mean cluster: round(4000 / 25 / 8) = 20.
    roomy = QuadBandit(probes=10, max_rounds=1, random_state=0).fit(clusters, tokens, 10**9, probe)
    assert roomy.block_docs_ == 20
    tiny_blocks = QuadBandit(probes=30, max_rounds=1, random_state=0).fit(clusters, tokens, 10**9, probe)
    assert tiny_blocks.block_docs_ == 30


def test_auto_tau_quantile_is_as_selective_as_the_budget():
    clusters, tokens, scores = _pool(n=4000, k=25, seed=5)
    total = int(tokens.sum())
    for budget, q in ((total // 10, 0.9), (total // 4, 0.75), (total * 3 // 4, 0.5), (total // 100, 0.9)):
        bandit = QuadBandit(max_rounds=1, random_state=0).fit(clusters, tokens, budget, _lookup(scores))
        expected = min(max(1 - budget / total, 0.5), 0.9)
        assert bandit.tau_quantile_ == pytest.approx(expected)
        assert bandit.tau_quantile_ == pytest.approx(q, abs=0.01)


def test_same_seed_same_selection_and_different_seed_differs():
    clusters, tokens, scores = _pool(n=5000, k=20, seed=6)
    nb = pl.DataFrame({"cluster": [0, 1, 2, 3], "neighbor": [1, 0, 3, 2], "distance": [0.05, 0.05, 0.1, 0.1]})

    def run(seed):
        return QuadBandit(arms_per_round=5, max_rounds=10, random_state=seed).fit(
            clusters, tokens, 20_000, _lookup(scores), nb, 0.2)

    a, b, c = run(11), run(11), run(12)
    assert np.array_equal(a.selected_, b.selected_) and np.array_equal(a.rounds_of_, b.rounds_of_)
    assert a.rounds_.equals(b.rounds_) and a.probes_.equals(b.probes_) and a.arms_.equals(b.arms_)
    assert not np.array_equal(a.selected_, c.selected_)


def test_bad_inputs_name_the_offending_value():
    clusters, tokens = np.zeros(4, dtype=np.int64), np.ones(4, dtype=np.int64)
    with pytest.raises(ValueError, match="nan"):
        QuadBandit(max_rounds=1).fit(clusters, tokens, 10, lambda idx: np.full(idx.size, np.nan))
    with pytest.raises(ValueError, match="shape"):
        QuadBandit(max_rounds=1).fit(clusters, tokens, 10, lambda idx: np.zeros(1))
    with pytest.raises(ValueError, match="probes must be an integer >= 1, got 0"):
        QuadBandit(probes=0).fit(clusters, tokens, 10, lambda idx: np.zeros(idx.size))
    with pytest.raises(ValueError, match="gamma"):
        QuadBandit().fit(clusters, tokens, 10, lambda idx: np.zeros(idx.size),
                         pl.DataFrame({"cluster": [0], "neighbor": [1], "distance": [0.1]}), None)
    with pytest.raises(ValueError, match="3 entries, tokens 4"):
        QuadBandit().fit(clusters[:3], tokens, 10, lambda idx: np.zeros(idx.size))
