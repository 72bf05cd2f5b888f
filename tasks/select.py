"""Select: fill the token budget with the Quad cluster bandit or a baseline (random, top-k, DSIR).

Quad ("Harnessing Diversity for Important Data Selection in Pretraining LLMs", ICLR 2025,
Algorithm 1): clusters are bandit arms; each round the top-B arms by UCB
`CS_j = R_j / T_j + alpha * sqrt(2 ln N / (T_j + 1))` are pulled; m documents of the arm's next
block are probed, reward `r = mean(probe scores) - tau`; the block is accepted when r > 0; the
reward is shared with neighbouring clusters (centroid distance d < gamma) with weight 1 - d/gamma.

Unlike the released code, the probes are drawn from the very block that is accepted or
rejected (one seeded shuffle per cluster, walked block by block), an arm is exhausted exactly
when its cursor reaches the end of its documents, and tau / alpha default to values calibrated
on random probe groups, so they sit on the scorer's own scale.

The probe scorer (select.probe_scorer) is a pool-wide score of the score stage ('combined' by
default), looked up, or 'influence', computed here for the probed documents only: the fitted
state the score stage saved is loaded once, and each round's probes are read from ingest_docs
and scored in one batched call (`Probe` scores each document once and counts them).

The two-level bandit (`TwoLevelQuad`, the default) works on its candidates only, the head of the pool by
rank score: the select task streams the pool through `rank_prefix` in doc_idx ranges (`PoolScan`), so
its memory follows the budget, not the pool. The other selectors take one array entry per document.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import duckdb

import numpy as np
import polars as pl
import scipy.sparse as sp

from quadflow.log import Progress, get_logger
from quadflow.settings import ConfigError, InfluenceSettings, SelectSettings
from quadflow.store import StageRef, connect, insert_frame, make_ref, query_sql, run_sql, stage_key, transaction
from quadflow.tasking import stage_task
from quadflow.tasks.featurize import load_ngrams
from quadflow.tasks.scorers.dsir import DSIR, gumbel_keys

VERSION = "select-1"
INFLUENCE = "influence"  # the on-demand probe scorer (score stage: fitted only)

# The bandit stops pulling once the selection is within 0.1% of the budget: further rounds would
# spend probes (expensive for the influence scorer) on at most 0.1% more tokens.
FULL_FRACTION = 0.999

REASON_BLOCK = "quad_block"
REASON_FILL = "quad_fill"
FILL_ROUND = -1  # rounds_of_ entry of a document taken by the fill phase (no bandit round)

ROUNDS_SCHEMA = {
    "round": pl.Int32, "cluster": pl.Int64, "ucb": pl.Float64, "mean_probe": pl.Float64,
    "reward": pl.Float64, "accepted": pl.Boolean, "block_start": pl.Int64, "block_docs": pl.Int64,
    "tokens_accepted": pl.Int64,
}
PROBES_SCHEMA = {"round": pl.Int32, "cluster": pl.Int64, "doc_idx": pl.Int64, "score": pl.Float64}
ARMS_SCHEMA = {
    "cluster": pl.Int64, "reward_sum": pl.Float64, "pulls": pl.Float64, "direct_pulls": pl.Int64,
    "cursor": pl.Int64, "size": pl.Int64, "exhausted": pl.Boolean,
}

ProbeFn = Callable[[np.ndarray], np.ndarray]


class Probe:
    """The bandit's probe_fn over a scorer, counting what scoring cost.

    Pool-wide scores (`Probe.lookup`) were computed by the score stage for every document; an
    on-demand scorer (`Probe(score_fn, n_docs)`, e.g. influence) is called once per round with the
    documents not scored yet, and each document's score is kept, so none is scored twice.
    """

    def __init__(self, score_fn: ProbeFn, n_docs: int, pool_wide: bool = False):
        self.score_fn = score_fn
        self.n_docs = int(n_docs)
        self.pool_wide = pool_wide
        self.seconds_ = 0.0  # wall time spent in score_fn
        self.calls_ = 0
        self._scores: dict[int, float] = {}  # doc_idx -> score of every document scored so far (on demand)

    @classmethod
    def lookup(cls, scores: np.ndarray) -> "Probe":
        """Probe by pool-wide scores, one per doc_idx."""
        scores = np.asarray(scores, dtype=np.float64)
        return cls(lambda idx: scores[idx], scores.size, pool_wide=True)

    @classmethod
    def lookup_at(cls, doc_idx: np.ndarray, scores: np.ndarray, n_docs: int) -> "Probe":
        """Probe by pool-wide scores known for the documents doc_idx only (the candidates): a pool of n_docs."""
        doc_idx = np.asarray(doc_idx, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float64)
        order = np.argsort(doc_idx, kind="stable")
        known, values = doc_idx[order], scores[order]

        def score_fn(idx: np.ndarray) -> np.ndarray:
            pos = np.minimum(np.searchsorted(known, idx), max(known.size - 1, 0))
            if known.size == 0 or not np.array_equal(known[pos], idx):
                raise ValueError(f"no score known for some probed documents (doc_idx {idx[:5].tolist()}...)")
            return values[pos]

        return cls(score_fn, n_docs, pool_wide=True)

    @property
    def docs_scored_(self) -> int:
        """Distinct documents whose score was computed: the whole pool for a pool-wide score."""
        return self.n_docs if self.pool_wide else len(self._scores)

    def _timed(self, idx: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = np.asarray(self.score_fn(idx), dtype=np.float64)
        self.seconds_ += time.perf_counter() - start
        self.calls_ += 1
        if out.shape != idx.shape:
            raise ValueError(f"probe scorer returned shape {out.shape} for {idx.size} documents")
        return out

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if self.pool_wide:
            return self._timed(idx)
        known = self._scores
        # sorted, so a round's call does not depend on probe order
        new = np.unique(np.fromiter((i for i in idx.tolist() if i not in known), dtype=np.int64))
        if new.size:
            known.update(zip(new.tolist(), self._timed(new).tolist()))
        return np.fromiter((known[i] for i in idx.tolist()), dtype=np.float64, count=idx.size)


# --------------------------------------------------------------------------------------------
# Core: budget filling and the baselines
# --------------------------------------------------------------------------------------------


def fill_budget(order: np.ndarray, tokens: np.ndarray, budget: int) -> np.ndarray:
    """Walk `order`, take each document that still fits: never over budget, filled as far as the pool allows."""
    order = np.asarray(order, dtype=np.int64).ravel()
    tokens = np.asarray(tokens)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget!r}")
    tok = tokens[order].astype(np.int64, copy=False)  # (len(order),) tokens in walk order
    if tok.size and tok.min() < 0:
        bad = int(order[np.argmin(tok)])
        raise ValueError(f"token counts must be >= 0, doc {bad} has {int(tokens[bad])}")
    csum = np.cumsum(tok)
    head = int(np.searchsorted(csum, budget, side="right"))  # order[:head] fits as a whole
    if head == order.size:
        return order.copy()
    remaining = int(budget - (csum[head - 1] if head else 0))
    # After the first misfit, walk the rest one by one, stopping once nothing left can fit.
    rest_tok = tok[head + 1:]
    if rest_tok.size == 0:
        return order[:head].copy()
    smallest_after = np.minimum.accumulate(rest_tok[::-1])[::-1].tolist()  # suffix minima
    taken: list[int] = []
    for i, t in enumerate(rest_tok.tolist()):
        if remaining < smallest_after[i]:
            break
        if t <= remaining:
            taken.append(i)
            remaining -= t
    return np.concatenate([order[:head], order[head + 1:][np.asarray(taken, dtype=np.int64)]])


def select_random(tokens: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """Uniform random documents until the budget is full: the floor every selector must beat."""
    n = np.asarray(tokens).shape[0]
    return fill_budget(np.random.default_rng(seed).permutation(n), tokens, budget)


def select_topk(scores: np.ndarray, tokens: np.ndarray, budget: int) -> np.ndarray:
    """Highest scores first (ties by doc_idx, NaN last): pure quality, no diversity."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != np.asarray(tokens).shape:
        raise ValueError(f"scores has shape {scores.shape}, tokens {np.asarray(tokens).shape}")
    neg = np.where(np.isnan(scores), np.inf, -scores)
    order = np.lexsort((np.arange(scores.size), neg))
    return fill_budget(order, tokens, budget)


def select_dsir(log_weights: np.ndarray, tokens: np.ndarray, budget: int, seed: int,
                min_tokens: int = 0) -> np.ndarray:
    """DSIR importance resampling without replacement (Gumbel top-k on log weights), to the budget.

    Documents shorter than `min_tokens` come after every longer one: they are drawn only when the
    longer documents cannot fill the budget (a pool of short records still gets a selection).
    """
    log_weights = np.asarray(log_weights, dtype=np.float64)
    tokens = np.asarray(tokens)
    if log_weights.shape != tokens.shape:
        raise ValueError(f"log_weights has shape {log_weights.shape}, tokens {tokens.shape}")
    if min_tokens < 0:
        raise ValueError(f"min_tokens must be >= 0, got {min_tokens!r}")
    keys = gumbel_keys(log_weights, seed)  # every document's key, so a document's key does not depend on min_tokens
    order = np.lexsort((np.arange(keys.size), -keys))
    if min_tokens:
        long_ = tokens[order] >= min_tokens
        order = np.concatenate([order[long_], order[~long_]])
    return fill_budget(order, tokens, budget)


# --------------------------------------------------------------------------------------------
# Core: the Quad bandit
# --------------------------------------------------------------------------------------------


def ucb_scores(reward_sum: np.ndarray, pulls: np.ndarray, total_pulls: int, alpha: float) -> np.ndarray:
    """CS_j = R_j/T_j + alpha*sqrt(2 ln N / (T_j + 1)); R/T is 0 for an unpulled arm, N is at least 1."""
    reward_sum = np.asarray(reward_sum, dtype=np.float64)
    pulls = np.asarray(pulls, dtype=np.float64)
    mean = np.divide(reward_sum, pulls, out=np.zeros_like(reward_sum), where=pulls > 0)
    return mean + alpha * np.sqrt(2.0 * np.log(max(total_pulls, 1)) / (pulls + 1.0))


class QuadBandit:
    """Quad's cluster bandit as an estimator: parameters in, `fit`, fitted state ending in `_`.

    Parameters follow the paper's names: arms_per_round = B, probes = m, block_docs = b
    (None: an eighth of the mean non-empty cluster, and no more than lets the budget take about
    ten rounds of fully accepted blocks; at least m), tau (None: the tau_quantile of calibration
    group means; tau_quantile None: 1 - budget / pool tokens, within [0.5, 0.9], so the bar is
    as selective as the budget), alpha (None: the std of calibration group means, so
    exploration is on the reward's scale; the paper's 1e-4 was for raw influence scores).
    """

    def __init__(self, arms_per_round: int = 50, probes: int = 10, block_docs: int | None = None,
                 max_rounds: int = 200, tau: float | None = None, tau_quantile: float | None = None,
                 alpha: float | None = None, calibration_blocks: int = 64,
                 random_state: int | None = 0):
        self.arms_per_round = arms_per_round
        self.probes = probes
        self.block_docs = block_docs
        self.max_rounds = max_rounds
        self.tau = tau
        self.tau_quantile = tau_quantile
        self.alpha = alpha
        self.calibration_blocks = calibration_blocks
        self.random_state = random_state

    @classmethod
    def from_settings(cls, settings: SelectSettings, seed: int) -> "QuadBandit":
        """The bandit a run's select settings describe, seeded with the run's seed."""
        return cls(arms_per_round=settings.arms_per_round, probes=settings.probes,
                   block_docs=settings.block_docs, max_rounds=settings.max_rounds, tau=settings.tau,
                   tau_quantile=settings.tau_quantile, alpha=settings.alpha,
                   calibration_blocks=settings.calibration_blocks, random_state=seed)

    def _check_params(self) -> None:
        for name in ("arms_per_round", "probes", "max_rounds", "calibration_blocks"):
            value = getattr(self, name)
            low = 2 if name == "calibration_blocks" else 1
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.block_docs is not None and (not isinstance(self.block_docs, (int, np.integer)) or self.block_docs < 1):
            raise ValueError(f"block_docs must be None or an integer >= 1, got {self.block_docs!r}")
        _check_bar(self.tau, self.tau_quantile, self.alpha)

    def fit(self, clusters: np.ndarray, tokens: np.ndarray, budget_tokens: int, probe_fn: ProbeFn,
            neighbors: pl.DataFrame | None = None, gamma: float | None = None) -> "QuadBandit":
        """Run the bandit to the budget; every round, probe and accepted block is kept as fitted state."""
        self._check_params()
        clusters, tokens = _checked_pool(clusters, tokens, budget_tokens)
        n = clusters.size
        rng_shuffle, rng_calib, rng_ties, rng_probe = (
            np.random.default_rng(s) for s in np.random.SeedSequence(self.random_state).spawn(4)
        )
        m = int(self.probes)

        # Arms: one per non-empty cluster; each arm's documents shuffled once, walked block by block.
        labels, arm_of_doc = np.unique(clusters, return_inverse=True)  # (k,), (n,)
        k = labels.size
        perm = rng_shuffle.permutation(n)
        order = perm[np.argsort(arm_of_doc[perm], kind="stable")]  # (n,) docs grouped by arm
        size = np.bincount(arm_of_doc, minlength=k).astype(np.int64)  # (k,)
        start = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)  # (k,) offsets into order
        tok_order = tokens[order]
        smallest_from = np.empty(n, dtype=np.int64)  # smallest doc from this position to its arm's end
        for a in range(k):
            s, e = start[a], start[a] + size[a]
            smallest_from[s:e] = np.minimum.accumulate(tok_order[s:e][::-1])[::-1]
        if self.block_docs is not None:
            b = int(self.block_docs)
        else:  # an eighth of a mean cluster, small enough for ~10 rounds of B accepted blocks
            per_round = 10 * int(self.arms_per_round) * max(float(tokens.mean()), 1.0)
            b = max(m, int(np.floor(min(n / k / 8, budget_tokens / per_round) + 0.5)))
        share = _neighbour_matrix(labels, neighbors, gamma)  # (k, k) sparse, [j, i] = weight of j's reward for i

        # Calibration: random probe groups put tau and alpha on the scorer's scale.
        probe_rounds: list[np.ndarray] = []
        probe_docs: list[np.ndarray] = []
        probe_scores: list[np.ndarray] = []
        tau, alpha = self.tau, self.alpha
        self.tau_quantile_ = None
        if tau is None or alpha is None:
            groups = _calibration_groups(rng_calib, n, m, int(self.calibration_blocks))  # (G, m')
            calib_scores = _probe(probe_fn, groups.ravel()).reshape(groups.shape)
            group_means = calib_scores.mean(axis=1)  # (G,)
            if tau is None:
                q = self.tau_quantile
                if q is None:  # as selective as the budget: 10% of the pool -> the 0.9 quantile
                    q = float(np.clip(1.0 - budget_tokens / max(int(tokens.sum()), 1), 0.5, 0.9))
                self.tau_quantile_ = q
                tau = float(np.quantile(group_means, q))
            if alpha is None:
                alpha = float(np.std(group_means))
            probe_rounds.append(np.zeros(groups.size, dtype=np.int32))
            probe_docs.append(groups.ravel())
            probe_scores.append(calib_scores.ravel())
        tau, alpha = float(tau), float(alpha)

        reward_sum = np.zeros(k)  # R_j, direct plus shared rewards
        pulls = np.zeros(k)  # T_j, direct pulls plus shared weights
        direct = np.zeros(k, dtype=np.int64)
        cursor = np.zeros(k, dtype=np.int64)  # position of the next block within the arm
        total_pulls = 0  # N
        remaining = int(budget_tokens)
        sel_docs: list[np.ndarray] = []
        sel_rounds: list[np.ndarray] = []
        rows: dict[str, list[Any]] = {c: [] for c in ROUNDS_SCHEMA}

        def budget_full() -> bool:
            """No unseen document of a live arm fits any more, or the budget is FULL_FRACTION used."""
            live = cursor < size
            if not live.any():
                return True
            smallest = int(smallest_from[(start + cursor)[live]].min())
            return remaining < smallest or budget_tokens - remaining >= FULL_FRACTION * budget_tokens

        n_rounds = 0
        stop = "max_rounds"
        for rnd in range(1, int(self.max_rounds) + 1):
            live_arms = np.flatnonzero(cursor < size)
            if live_arms.size == 0:
                stop = "no_live_arms"
                break
            if budget_full():
                stop = "budget_full"
                break
            n_rounds = rnd
            ucb = ucb_scores(reward_sum, pulls, total_pulls, alpha)  # (k,)
            ties = rng_ties.permutation(k)  # a fresh random tie order each round
            pick = np.lexsort((ties[live_arms], -ucb[live_arms]))[: int(self.arms_per_round)]
            pulled = live_arms[pick]  # (B',) arms in UCB order

            blocks, probe_idx = [], []
            for a in pulled:
                lo = start[a] + cursor[a]
                block = order[lo: lo + min(b, size[a] - cursor[a])]
                blocks.append(block)
                probe_idx.append(block[rng_probe.choice(block.size, size=min(m, block.size), replace=False)])
            counts = np.array([p.size for p in probe_idx])
            flat = np.concatenate(probe_idx)
            scores = _probe(probe_fn, flat)  # one batched call per round
            means = np.add.reduceat(scores, np.concatenate([[0], np.cumsum(counts)[:-1]])) / counts
            rewards = means - tau  # (B',)

            for a, block, mean, r in zip(pulled, blocks, means, rewards):
                tokens_in = 0
                if r > 0:
                    took = fill_budget(block, tokens, remaining)
                    tokens_in = int(tokens[took].sum())
                    remaining -= tokens_in
                    sel_docs.append(took)
                    sel_rounds.append(np.full(took.size, rnd, dtype=np.int64))
                _record_pull(rows, rnd, int(labels[a]), float(ucb[a]), float(mean), float(r), int(cursor[a]),
                             int(block.size), tokens_in)
            probe_rounds.append(np.full(flat.size, rnd, dtype=np.int32))
            probe_docs.append(flat)
            probe_scores.append(scores)

            cursor[pulled] += [blk.size for blk in blocks]
            reward_sum[pulled] += rewards
            pulls[pulled] += 1.0
            direct[pulled] += 1
            total_pulls += pulled.size
            _share_rewards(share, pulled, rewards, reward_sum, pulls)
        else:
            if (cursor >= size).all():
                stop = "no_live_arms"
            elif budget_full():
                stop = "budget_full"

        # Fill phase: rounds ran out before the budget was full. The unseen rest of every live arm,
        # best estimated reward first, fills the budget; without it a short max_rounds would
        # leave most of the budget empty (the required fill is >= 98% when the pool is large enough).
        n_fill = 0
        if not budget_full():
            live_arms = np.flatnonzero(cursor < size)
            est = np.divide(reward_sum, pulls, out=np.zeros(k), where=pulls > 0)
            ranked = live_arms[np.lexsort((labels[live_arms], -est[live_arms]))]
            rest = np.concatenate([order[start[a] + cursor[a]: start[a] + size[a]] for a in ranked])
            took = fill_budget(rest, tokens, remaining)
            remaining -= int(tokens[took].sum())
            sel_docs.append(took)
            sel_rounds.append(np.full(took.size, FILL_ROUND, dtype=np.int64))
            n_fill = took.size
        if remaining > 0 and budget_tokens - remaining < FULL_FRACTION * budget_tokens:
            # Still short (the budget is near the pool's size): documents of rejected blocks come
            # last, best estimated cluster reward first, so the budget is filled if the pool can.
            est = np.divide(reward_sum, pulls, out=np.zeros(k), where=pulls > 0)
            taken = np.zeros(n, dtype=bool)
            for docs_ in sel_docs:
                taken[docs_] = True
            ranked = np.lexsort((labels, -est))
            rest = np.concatenate([order[start[a]: start[a] + size[a]] for a in ranked])
            rest = rest[~taken[rest]]
            took = fill_budget(rest, tokens, remaining)
            remaining -= int(tokens[took].sum())
            sel_docs.append(took)
            sel_rounds.append(np.full(took.size, FILL_ROUND, dtype=np.int64))
            n_fill += took.size

        self.selected_ = np.concatenate(sel_docs) if sel_docs else np.zeros(0, dtype=np.int64)
        self.rounds_of_ = np.concatenate(sel_rounds) if sel_rounds else np.zeros(0, dtype=np.int64)
        self.reasons_ = np.where(self.rounds_of_ == FILL_ROUND, REASON_FILL, REASON_BLOCK).astype(object)
        self.rounds_ = pl.DataFrame(rows, schema=ROUNDS_SCHEMA)
        p_docs = np.concatenate(probe_docs) if probe_docs else np.zeros(0, dtype=np.int64)
        self.probes_ = pl.DataFrame({
            "round": np.concatenate(probe_rounds) if probe_rounds else np.zeros(0, dtype=np.int32),
            "cluster": clusters[p_docs].astype(np.int64),
            "doc_idx": p_docs.astype(np.int64),
            "score": np.concatenate(probe_scores) if probe_scores else np.zeros(0),
        }, schema=PROBES_SCHEMA)
        self.arms_ = pl.DataFrame({
            "cluster": labels.astype(np.int64), "reward_sum": reward_sum, "pulls": pulls,
            "direct_pulls": direct, "cursor": cursor, "size": size, "exhausted": cursor >= size,
        }, schema=ARMS_SCHEMA)
        self.tau_, self.alpha_, self.block_docs_ = tau, alpha, b
        self.n_rounds_ = n_rounds
        self.n_probed_ = int(np.unique(p_docs).size)
        self.n_fill_ = int(n_fill)
        self.stop_reason_ = stop
        self.tokens_selected_ = int(budget_tokens - remaining)
        return self


# --------------------------------------------------------------------------------------------
# Core: the two-level Quad bandit (clusters decide how many, documents decide which)
# --------------------------------------------------------------------------------------------

# Candidate tiers, taken in this order (reason codes of the documents each one contributes).
SURE, LIKELY, RELATED, OUTSIDE = 0, 1, 2, 3
TIER_REASONS = {SURE: "quad_target_kind", LIKELY: "quad_likely_target_kind", RELATED: "quad_related"}


@dataclass(frozen=True)
class Novelty:
    """What the diversity discount measures against: the target's n-gram distribution and the documents'.

    target_totals, pool_totals: (V,) summed hashed n-gram counts of the target set and of the pool
    (without a target, the pool stands in for it: coverage of the pool); rows(idx) -> (len(idx), V)
    CSR counts of the pool documents idx (sorted ascending).
    """

    target_totals: np.ndarray
    pool_totals: np.ndarray
    rows: Callable[[np.ndarray], sp.csr_matrix]


def novelty_gain(counts: sp.csr_matrix, tokens: np.ndarray, selected: np.ndarray, p_target: np.ndarray,
                 p_pool: np.ndarray, prior: float) -> np.ndarray:
    """Exact drop of KL(target || selection) per token from adding each document alone: (n,) nats per token.

    The selection's n-gram distribution is smoothed with `prior` pseudo-counts of the pool's, q(b) =
    (n(b) + prior p_pool(b)) / (N + prior). Adding a document with counts c changes -sum_b p_T(b) log q(b)
    by sum_b p_T(b) log(1 + c(b) / n'(b)) - log(1 + |c| / N'), with n' and N' the smoothed counts:
    documents whose n-grams the target uses and the selection lacks gain most, repeats of what is
    already taken gain little, and a long document's repeated n-grams count with diminishing returns.
    """
    n_prime = selected + prior * p_pool  # (V,)
    total = float(selected.sum() + prior)
    contrib = p_target[counts.indices] * np.log1p(counts.data / n_prime[counts.indices])  # (nnz,)
    per_doc = np.zeros(counts.shape[0])
    nonempty = np.diff(counts.indptr) > 0
    if contrib.size:
        per_doc[nonempty] = np.add.reduceat(contrib, counts.indptr[:-1][nonempty])
    n_grams = np.asarray(counts.sum(axis=1)).ravel()
    return (per_doc - np.log1p(n_grams / total)) / np.maximum(np.asarray(tokens, dtype=np.float64), 1.0)


class NoveltyGains:
    """novelty_gain for rows of one fixed candidate matrix, recomputed every round without copying it.

    The same arithmetic as novelty_gain, element for element (so the same gains, bit for bit), but
    what does not change between rounds is computed once: the documents' n-gram totals and where each
    count sits in a (small counts x buckets) table. A round then evaluates p_target(b) log1p(c / n'(b))
    once per (count, bucket) pair, not once per stored count, gathers it and sums each document's
    entries, `chunk` stored counts at a time: about five times faster than slicing the rows, on a full
    pool's candidates (293k documents, 27M stored counts). It holds 4 bytes per stored count besides the
    matrix (float32 counts are kept as they are), and a round's scratch is one chunk.
    """

    SMALL = 32  # counts 1..SMALL come from the table; larger ones (rare) are computed directly
    CHUNK = 1 << 21  # stored counts a round gathers and sums at a time

    def __init__(self, counts: sp.csr_matrix, p_target: np.ndarray, chunk: int = CHUNK):
        counts = sp.csr_matrix(counts)
        if counts.dtype not in (np.float32, np.float64):
            counts = counts.astype(np.float64)
        self.counts = counts
        self.p_target = np.asarray(p_target, dtype=np.float64)
        self.n_buckets = counts.shape[1]
        data = counts.data
        small = (data >= 1) & (data <= self.SMALL) & (data == np.floor(data))
        code_type = np.int32 if self.SMALL * self.n_buckets < 2**31 else np.int64
        c = np.where(small, data, 1).astype(code_type)
        c -= 1
        c *= self.n_buckets
        c += counts.indices
        c[~small] = 0
        self.code = c  # (nnz,) position of each stored count in the round's table
        self.large = np.flatnonzero(~small)
        self.nonempty = np.diff(counts.indptr) > 0
        self.n_grams = np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()
        # Row blocks of about `chunk` stored counts each (a longer row is a block of its own).
        nnz, indptr = counts.nnz, counts.indptr
        cuts = np.searchsorted(indptr, np.arange(chunk, nnz, chunk), side="right") - 1
        self.blocks = np.unique(np.concatenate([[0], cuts, [counts.shape[0]]]))

    def __call__(self, rows: np.ndarray, tokens: np.ndarray, selected: np.ndarray, p_pool: np.ndarray,
                 prior: float) -> np.ndarray:
        """(len(rows),) novelty_gain of the candidate rows `rows` against `selected`."""
        c = self.counts
        n_prime = selected + prior * p_pool  # (V,)
        total = float(selected.sum() + prior)
        table = (self.p_target[None, :]
                 * np.log1p(np.arange(1, self.SMALL + 1, dtype=np.float64)[:, None] / n_prime[None, :])).ravel()
        per_doc = np.zeros(c.shape[0])
        for r0, r1 in zip(self.blocks[:-1], self.blocks[1:]):
            lo, hi = c.indptr[r0], c.indptr[r1]
            contrib = table[self.code[lo:hi]]  # (hi - lo,)
            large = self.large[np.searchsorted(self.large, lo):np.searchsorted(self.large, hi)]
            if large.size:
                b = c.indices[large]
                contrib[large - lo] = self.p_target[b] * np.log1p(c.data[large] / n_prime[b])
            nonempty = self.nonempty[r0:r1]
            if contrib.size:
                per_doc[r0:r1][nonempty] = np.add.reduceat(contrib, c.indptr[r0:r1][nonempty] - lo)
        rows = np.asarray(rows)
        return ((per_doc[rows] - np.log1p(self.n_grams[rows] / total))
                / np.maximum(np.asarray(tokens, dtype=np.float64), 1.0))


@dataclass(frozen=True)
class PoolBatch:
    """Documents of the selector's pool in ascending doc_idx: all the two-level bandit reads of each.

    doc_idx (b,) int64; tokens (b,) int64 >= 0; clusters (b,) int64 labels; rank (b,) float64 finite rank
    scores; probe (b,) float64, a pool-wide probe score other than the rank score (None: probes look up rank).
    """

    doc_idx: np.ndarray
    tokens: np.ndarray
    clusters: np.ndarray
    rank: np.ndarray
    probe: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.doc_idx.size)

    def take(self, idx: np.ndarray) -> "PoolBatch":
        """The documents at positions (or a mask) idx, in that order."""
        return PoolBatch(self.doc_idx[idx], self.tokens[idx], self.clusters[idx], self.rank[idx],
                         None if self.probe is None else self.probe[idx])

    @classmethod
    def concat(cls, batches: list["PoolBatch"]) -> "PoolBatch":
        probes = [b.probe for b in batches]
        return cls(*(np.concatenate([getattr(b, name) for b in batches])
                     for name in ("doc_idx", "tokens", "clusters", "rank")),
                   probe=None if any(p is None for p in probes) else np.concatenate(probes))

    @classmethod
    def empty(cls) -> "PoolBatch":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))


# One pass over the selector's pool, in ascending doc_idx, as batches; every call starts a fresh pass.
PoolScan = Callable[[], Iterable[PoolBatch]]


def array_pool(tokens: np.ndarray, clusters: np.ndarray, rank_scores: np.ndarray,
               batch_docs: int | None = None) -> PoolScan:
    """The pool held in arrays as a PoolScan (doc_idx = position), in batches of batch_docs (None: one)."""
    n = np.asarray(tokens).size
    step = max(n, 1) if batch_docs is None else int(batch_docs)

    def scan() -> Iterator[PoolBatch]:
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            yield PoolBatch(np.arange(lo, hi, dtype=np.int64), tokens[lo:hi], clusters[lo:hi], rank_scores[lo:hi])

    return scan


def _checked_batch(batch: PoolBatch, after_doc: int) -> PoolBatch:
    """The batch with its columns as int64 / float64, checked: ascending doc_idx past after_doc, tokens >= 0,
    integer labels, finite rank scores."""
    doc_idx, clusters = np.asarray(batch.doc_idx), np.asarray(batch.clusters)
    tokens, rank = np.asarray(batch.tokens), np.asarray(batch.rank, dtype=np.float64)
    n = doc_idx.size
    if not (tokens.size == clusters.size == rank.size == n) or (batch.probe is not None and batch.probe.size != n):
        raise ValueError(f"a pool batch's columns differ in length: {n} doc_idx, {tokens.size} tokens, "
                         f"{clusters.size} clusters, {rank.size} rank scores")
    if n and (doc_idx[0] <= after_doc or (n > 1 and not (np.diff(doc_idx) > 0).all())):
        raise ValueError(f"a pool scan must yield ascending doc_idx; got {doc_idx[:3].tolist()}... after {after_doc}")
    if n:
        _check_labels_and_tokens(clusters, tokens)
    if not np.isfinite(rank).all():
        bad = int(np.flatnonzero(~np.isfinite(rank))[0])
        raise ValueError(f"rank score of doc {int(doc_idx[bad])} is {float(rank[bad])!r}; rank scores must be finite")
    probe = None if batch.probe is None else np.asarray(batch.probe, dtype=np.float64)
    return PoolBatch(doc_idx.astype(np.int64, copy=False), tokens.astype(np.int64, copy=False),
                     clusters.astype(np.int64, copy=False), rank, probe)


@dataclass(frozen=True)
class RankPrefix:
    """The head of a pool by rank score, from one pass of its scan.

    docs: best rank score first, ties by doc_idx; cut: (rank, doc_idx) of its last document when documents
    rank after it (None: docs is every document that counted); n_docs: documents the pass read; labels: their
    distinct cluster labels, sorted.
    """

    docs: PoolBatch
    cut: tuple[float, int] | None
    n_docs: int
    labels: np.ndarray


def rank_prefix(scan: PoolScan, limit: float, after: tuple[float, int] | None = None,
                max_tokens: int | None = None) -> RankPrefix:
    """The shortest head of the pool by rank score (ties by doc_idx) holding at least `limit` tokens, in one pass.

    Only documents ranked after `after` and no longer than `max_tokens` count. Memory follows the head, not
    the pool: each batch is merged into the head held so far and the merge is cut again at `limit` tokens;
    once the head is that long, a document ranked after its last one can never enter, and is dropped on
    arrival (batches come in ascending doc_idx, so a later tie with the last document ranks after it).
    """
    held: PoolBatch | None = None
    bar: float | None = None  # rank score of the head's last document, once the head holds `limit` tokens
    n, last, labels = 0, -1, np.zeros(0, dtype=np.int64)
    for raw in scan():
        batch = _checked_batch(raw, last)
        if batch.size == 0:
            continue
        n += batch.size
        last = int(batch.doc_idx[-1])
        labels = np.union1d(labels, batch.clusters)
        keep = np.ones(batch.size, dtype=bool)
        if after is not None:
            keep &= (batch.rank < after[0]) | ((batch.rank == after[0]) & (batch.doc_idx > after[1]))
        if max_tokens is not None:
            keep &= batch.tokens <= max_tokens
        if bar is not None:
            keep &= batch.rank > bar
        if not keep.any():
            continue
        held = batch.take(keep) if held is None else PoolBatch.concat([held, batch.take(keep)])
        order = np.lexsort((held.doc_idx, -held.rank))
        cum = np.cumsum(held.tokens[order])
        if cum[-1] >= limit:
            order = order[: int(np.searchsorted(cum, limit, side="left")) + 1]
            bar = float(held.rank[order[-1]])
        held = held.take(order)
    if held is None:
        held = PoolBatch.empty()
    cut = None if bar is None else (bar, int(held.doc_idx[-1]))
    return RankPrefix(held, cut, n, labels)


def prefix_tiers(head: PoolBatch, budget: int, theta: float | None, theta_likely: float | None,
                 max_doc_share: float) -> tuple[np.ndarray, dict]:
    """(len(head),) tier of every candidate (the head of the pool by rank score) and what decided it.

    SURE: scores at least theta, the score most of the target's own documents reach (out of fold), whatever
    its length; LIKELY: at least theta_likely, a score nearly all of them reach; RELATED: the other
    candidates. A LIKELY or RELATED document longer than max_doc_share of the budget is no candidate (OUTSIDE:
    it is left to the fill): one such document could otherwise take a tenth of the budget on an uncertain
    score. Without theta (no classifier fitted on a target) every candidate is RELATED.
    """
    tier = np.full(head.size, OUTSIDE, dtype=np.int8)
    short = head.tokens <= max_doc_share * budget
    tier[short] = RELATED
    if theta is not None:
        low = theta if theta_likely is None else min(theta, theta_likely)
        tier[short & (head.rank >= low)] = LIKELY
        tier[head.rank >= theta] = SURE
    info: dict[str, Any] = {"candidate_docs": head.size, "theta": theta, "theta_likely": theta_likely}
    for name, t in (("target_kind_tokens", SURE), ("likely_target_kind_tokens", LIKELY), ("related_tokens", RELATED)):
        info[name] = int(head.tokens[tier == t].sum())
    return tier, info


def candidate_tiers(rank_scores: np.ndarray, tokens: np.ndarray, budget: int, multiple: float,
                    theta: float | None, theta_likely: float | None, max_doc_share: float) -> tuple[np.ndarray, dict]:
    """(n,) tier of every document and what decided it (prefix_tiers of the pool's head holding `multiple` x
    the budget in tokens; every other document is OUTSIDE)."""
    rank_scores = np.asarray(rank_scores, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.int64)
    head = rank_prefix(array_pool(tokens, np.zeros(tokens.size, dtype=np.int64), rank_scores), multiple * budget).docs
    head_tier, info = prefix_tiers(head, budget, theta, theta_likely, max_doc_share)
    tier = np.full(tokens.size, OUTSIDE, dtype=np.int8)
    tier[head.doc_idx] = head_tier
    return tier, info


class TwoLevelQuad:
    """Quad with two levels: the bandit decides how many documents a cluster gives, their utility which.

    Every round the documents propose: each live candidate of the current tier gets a utility (the
    novelty gain, a diversity discount against what is already selected; the LIKELY tier goes by rank
    score), and the best of them holding budget / rounds tokens clear the round's bar. The clusters
    dispose: each cluster with documents above the bar is an arm with that block on offer; the bandit
    pulls at most `arms_per_round` of them by UCB (CS_j = R_j / T_j + alpha * sqrt(2 ln N / (T_j + 1))),
    probes m documents of each pulled block with the probe scorer, and accepts the block when
    r = mean(probes) - tau > 0. Rewards are shared with neighbouring clusters as in Quad. A round 0
    probes every arm once to calibrate tau and alpha before anything is accepted.

    With the default probe scorer (the rank score itself, looked up) probes are exact and tau sits at
    the worst calibration mean, so the bar and the tiers decide; with an on-demand probe scorer
    (influence) only probed documents are scored and blocks below tau (default: the median
    calibration mean) are rejected, their cluster's reward and its neighbours' fall, and UCB moves on.
    """

    def __init__(self, arms_per_round: int = 50, probes: int = 10, rounds: int = 30, max_rounds: int = 200,
                 candidate_multiple: float = 8.0, max_doc_share: float = 0.03,
                 novelty_prior: float = 0.1, diversity: bool = True, tau: float | None = None,
                 tau_quantile: float | None = None, alpha: float | None = None, random_state: int | None = 0):
        self.arms_per_round = arms_per_round
        self.probes = probes
        self.rounds = rounds
        self.max_rounds = max_rounds
        self.candidate_multiple = candidate_multiple
        self.max_doc_share = max_doc_share
        self.novelty_prior = novelty_prior
        self.diversity = diversity
        self.tau = tau
        self.tau_quantile = tau_quantile
        self.alpha = alpha
        self.random_state = random_state

    @classmethod
    def from_settings(cls, settings: SelectSettings, seed: int) -> "TwoLevelQuad":
        """The bandit a run's select settings describe, seeded with the run's seed."""
        return cls(arms_per_round=settings.arms_per_round, probes=settings.probes, rounds=settings.rounds,
                   max_rounds=settings.max_rounds, candidate_multiple=settings.candidate_multiple,
                   max_doc_share=settings.max_doc_share,
                   novelty_prior=settings.novelty_prior, diversity=settings.diversity, tau=settings.tau,
                   tau_quantile=settings.tau_quantile, alpha=settings.alpha, random_state=seed)

    def _check_params(self) -> None:
        for name in ("arms_per_round", "probes", "rounds", "max_rounds"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.candidate_multiple >= 1:
            raise ValueError(f"candidate_multiple must be >= 1, got {self.candidate_multiple!r}")
        if not 0.0 < self.max_doc_share <= 1.0:
            raise ValueError(f"max_doc_share must be in (0, 1], got {self.max_doc_share!r}")
        if not self.novelty_prior > 0:
            raise ValueError(f"novelty_prior must be > 0, got {self.novelty_prior!r}")
        _check_bar(self.tau, self.tau_quantile, self.alpha)

    def fit(self, clusters: np.ndarray, tokens: np.ndarray, budget_tokens: int, rank_scores: np.ndarray,
            probe_fn: ProbeFn, novelty: Novelty, theta: float | None = None, theta_likely: float | None = None,
            probe_is_rank: bool = True, neighbors: pl.DataFrame | None = None,
            gamma: float | None = None, progress: Callable[[int], None] | None = None) -> "TwoLevelQuad":
        """fit_pool on a pool held in arrays (doc_idx = position)."""
        self._check_params()
        clusters, tokens = _checked_pool(clusters, tokens, budget_tokens)
        rank_scores = np.asarray(rank_scores, dtype=np.float64).ravel()
        if rank_scores.shape != tokens.shape:
            raise ValueError(f"rank_scores has {rank_scores.size} entries, tokens {tokens.size}")
        return self.fit_pool(array_pool(tokens, clusters, rank_scores), budget_tokens, novelty, probe_fn, theta,
                             theta_likely, probe_is_rank, neighbors, gamma, progress)

    def fit_pool(self, pool: PoolScan, budget_tokens: int, novelty: Novelty, probe_fn: ProbeFn | None = None,
                 theta: float | None = None, theta_likely: float | None = None, probe_is_rank: bool = True,
                 neighbors: pl.DataFrame | None = None, gamma: float | None = None,
                 progress: Callable[[int], None] | None = None) -> "TwoLevelQuad":
        """Run the rounds to the budget; every round, probe and accepted block is kept as fitted state.

        One pass of `pool` keeps its head by rank score holding `candidate_multiple` x the budget (the
        candidates, and the first documents of the fill); nothing else of the pool is held, so memory
        follows the budget, not the pool. A fill that walks past the head scans the pool again.
        `probe_fn` None: probes look up the batches' probe score, or their rank score. `progress(tokens)` is
        called after every round with the tokens it took.
        """
        self._check_params()
        if budget_tokens < 0:
            raise ValueError(f"budget_tokens must be >= 0, got {budget_tokens!r}")
        budget = int(budget_tokens)
        head = rank_prefix(pool, self.candidate_multiple * budget)
        if head.n_docs == 0:
            raise ValueError("the pool is empty: there is nothing to select from")
        if probe_fn is None:
            probe_fn = Probe.lookup_at(head.docs.doc_idx, head.docs.rank if head.docs.probe is None
                                       else head.docs.probe, head.n_docs)
        self.probe_ = probe_fn
        rng_calib, rng_probe = (np.random.default_rng(s) for s in np.random.SeedSequence(self.random_state).spawn(2))
        m = int(self.probes)
        labels = head.labels  # (k,) every cluster of the pool
        k = labels.size
        share = _neighbour_matrix(labels, neighbors, gamma)

        head_tier, self.tiers_ = prefix_tiers(head.docs, budget, theta, theta_likely, self.max_doc_share)
        in_cand = np.flatnonzero(head_tier < OUTSIDE)
        in_cand = in_cand[np.argsort(head.docs.doc_idx[in_cand], kind="stable")]
        cands = head.docs.take(in_cand)  # the candidates by doc_idx
        cand = cands.doc_idx  # (c,) sorted doc_idx
        counts = sp.csr_matrix(novelty.rows(cand))  # (c, V) float32 or float64 counts
        if counts.dtype not in (np.float32, np.float64):
            counts = counts.astype(np.float64)
        if counts.shape[0] != cand.size:
            raise ValueError(f"novelty.rows returned {counts.shape[0]} rows for {cand.size} candidates")
        p_target = (np.asarray(novelty.target_totals, dtype=np.float64) + 1.0)
        p_target /= p_target.sum()
        p_pool = (np.asarray(novelty.pool_totals, dtype=np.float64) + 1.0)
        p_pool /= p_pool.sum()
        if p_target.shape != p_pool.shape or counts.shape[1] != p_pool.size:
            raise ValueError(f"n-gram spaces differ: target {p_target.size}, pool {p_pool.size}, rows {counts.shape[1]}")
        prior = float(self.novelty_prior) * max(budget, 1)
        gains = NoveltyGains(counts, p_target) if self.diversity else None
        c_tier, c_tok, c_rank = head_tier[in_cand], cands.tokens, cands.rank
        c_arm = np.searchsorted(labels, cands.clusters)  # (c,) arm of each candidate
        state = np.zeros(cand.size, dtype=np.int8)  # 0 live, 1 taken, 2 rejected
        selected = np.zeros(p_pool.size)  # (V,) n-gram counts of the selection

        # Round 0: probe every arm's candidates once; tau and alpha come from these means.
        probe_rounds, probe_docs, probe_scores, probe_arms = [], [], [], []
        arms_with = np.unique(c_arm)
        calib_pos, calib_arm = [], []
        for a in arms_with:
            pos = np.flatnonzero(c_arm == a)
            pick = rng_calib.choice(pos, size=min(m, pos.size), replace=False)
            calib_pos.append(np.sort(pick))
            calib_arm.append(np.full(pick.size, a))
        flat0 = np.concatenate(calib_pos) if calib_pos else np.zeros(0, dtype=np.int64)
        scores0 = _probe(probe_fn, cand[flat0]) if flat0.size else np.zeros(0)
        arm0 = np.concatenate(calib_arm) if calib_arm else np.zeros(0, dtype=np.int64)
        means0 = np.bincount(arm0, weights=scores0, minlength=k)[arms_with] / np.bincount(arm0, minlength=k)[arms_with]
        q_tau = self.tau_quantile if self.tau_quantile is not None else (0.0 if probe_is_rank else 0.5)
        tau = self.tau if self.tau is not None else (float(np.quantile(means0, q_tau)) if means0.size else 0.0)
        alpha = self.alpha if self.alpha is not None else (float(np.std(means0)) if means0.size else 0.0)
        probe_rounds.append(np.zeros(flat0.size, dtype=np.int32))
        probe_docs.append(cand[flat0])
        probe_scores.append(scores0)
        probe_arms.append(c_arm[flat0])
        reward_sum = np.zeros(k)
        pulls = np.zeros(k)
        reward_sum[arms_with] = means0 - tau
        pulls[arms_with] = 1.0
        direct = np.zeros(k, dtype=np.int64)
        total_pulls = int(arms_with.size)

        remaining = budget
        round_tokens = int(np.ceil(budget / int(self.rounds)))
        rows: dict[str, list[Any]] = {c: [] for c in ROUNDS_SCHEMA}
        sel_docs, sel_clusters, sel_rounds, sel_reasons = [], [], [], []
        stop, n_rounds = "max_rounds", 0
        for rnd in range(1, int(self.max_rounds) + 1):
            if budget - remaining >= FULL_FRACTION * budget:
                stop = "budget_full"
                break
            live = (state == 0) & (c_tok <= remaining)
            if not live.any():
                stop = "no_candidates"
                break
            t_min = int(c_tier[live].min())
            pos = np.flatnonzero(live & (c_tier == t_min))  # positions into cand
            if t_min == LIKELY or not self.diversity:
                key = c_rank[pos]
            else:
                key = gains(pos, c_tok[pos], selected, p_pool, prior)
            walk = pos[np.lexsort((cand[pos], -key))]  # best utility first, ties by doc_idx
            csum = np.cumsum(c_tok[walk])
            proposal = walk[: int(np.searchsorted(csum, round_tokens, side="left")) + 1]
            proposal = proposal[np.cumsum(c_tok[proposal]) <= remaining] if csum[-1] > remaining else proposal
            if proposal.size == 0:
                proposal = walk[:1]
            n_rounds = rnd
            offered = np.unique(c_arm[proposal])
            ucb = ucb_scores(reward_sum, pulls, total_pulls, alpha)  # (k,)
            pulled = offered[np.lexsort((labels[offered], -ucb[offered]))][: int(self.arms_per_round)]
            blocks = [proposal[c_arm[proposal] == a] for a in pulled]
            picks = [b[np.sort(rng_probe.choice(b.size, size=min(m, b.size), replace=False))] for b in blocks]
            flat_pos = np.concatenate(picks)
            scores = _probe(probe_fn, cand[flat_pos])
            sizes = np.array([p.size for p in picks])
            means = np.add.reduceat(scores, np.concatenate([[0], np.cumsum(sizes)[:-1]])) / sizes
            rewards = means - tau
            for a, block, mean, r in zip(pulled, blocks, means, rewards):
                took_tokens = 0
                if r > 0:
                    fits = block[np.cumsum(c_tok[block]) <= remaining]
                    state[fits] = 1
                    took_tokens = int(c_tok[fits].sum())
                    remaining -= took_tokens
                    if fits.size:
                        selected += np.asarray(counts[fits].sum(axis=0, dtype=np.float64)).ravel()
                        sel_docs.append(cand[fits])
                        sel_clusters.append(cands.clusters[fits])
                        sel_rounds.append(np.full(fits.size, rnd, dtype=np.int64))
                        sel_reasons.append(np.array([TIER_REASONS[int(t)] for t in c_tier[fits]], dtype=object))
                else:
                    state[block] = 2
                _record_pull(rows, rnd, int(labels[a]), float(ucb[a]), float(mean), float(r), int(direct[a]),
                             int(block.size), took_tokens)
            probe_rounds.append(np.full(flat_pos.size, rnd, dtype=np.int32))
            probe_docs.append(cand[flat_pos])
            probe_scores.append(scores)
            probe_arms.append(c_arm[flat_pos])
            reward_sum[pulled] += rewards
            pulls[pulled] += 1.0
            direct[pulled] += 1
            total_pulls += pulled.size
            _share_rewards(share, pulled, rewards, reward_sum, pulls)
            if progress is not None:
                progress(int(sum(rows["tokens_accepted"][-pulled.size:])))
        else:
            stop = "budget_full" if budget - remaining >= FULL_FRACTION * budget else "max_rounds"

        # Fill: what the rounds left of the budget goes to the best remaining documents by rank score,
        # documents of rejected blocks last: the head's, then (scanning the pool again) those ranked after it
        # that still fit, then the rejected ones.
        n_fill, self.fill_scans_ = 0, 0
        if remaining > 0 and budget - remaining < FULL_FRACTION * budget:
            in_taken = np.isin(head.docs.doc_idx, cand[state == 1], assume_unique=True)
            in_rejected = np.isin(head.docs.doc_idx, cand[state == 2], assume_unique=True)
            walks = [head.docs.take(~in_taken & ~in_rejected)]
            after = head.cut
            while True:
                for docs in walks:
                    took = docs.take(fill_budget(np.arange(docs.size), docs.tokens, remaining))
                    remaining -= int(took.tokens.sum())
                    sel_docs.append(took.doc_idx)
                    sel_clusters.append(took.clusters)
                    n_fill += took.size
                if after is None:
                    break
                # The next documents by rank score that could still fit, candidate_multiple x (remaining + 1)
                # tokens of them: more than fit, so each scan ends the fill or walks past documents that no
                # longer fit (and the next scan leaves those out).
                more = rank_prefix(pool, self.candidate_multiple * (remaining + 1), after=after, max_tokens=remaining)
                self.fill_scans_ += 1
                walks, after = [more.docs], more.cut
            rejected = head.docs.take(in_rejected)
            took = rejected.take(fill_budget(np.arange(rejected.size), rejected.tokens, remaining))
            remaining -= int(took.tokens.sum())
            sel_docs.append(took.doc_idx)
            sel_clusters.append(took.clusters)
            n_fill += took.size
            sel_rounds.append(np.full(n_fill, FILL_ROUND, dtype=np.int64))
            sel_reasons.append(np.full(n_fill, REASON_FILL, dtype=object))

        self.selected_ = np.concatenate(sel_docs) if sel_docs else np.zeros(0, dtype=np.int64)
        self.selected_clusters_ = np.concatenate(sel_clusters) if sel_clusters else np.zeros(0, dtype=np.int64)
        self.rounds_of_ = np.concatenate(sel_rounds) if sel_rounds else np.zeros(0, dtype=np.int64)
        self.reasons_ = np.concatenate(sel_reasons) if sel_reasons else np.zeros(0, dtype=object)
        self.rounds_ = pl.DataFrame(rows, schema=ROUNDS_SCHEMA)
        p_docs = np.concatenate(probe_docs)
        self.probes_ = pl.DataFrame({
            "round": np.concatenate(probe_rounds), "cluster": labels[np.concatenate(probe_arms)].astype(np.int64),
            "doc_idx": p_docs.astype(np.int64), "score": np.concatenate(probe_scores),
        }, schema=PROBES_SCHEMA)
        size = np.bincount(c_arm, minlength=k).astype(np.int64)
        cursor = np.bincount(c_arm[state == 1], minlength=k).astype(np.int64)
        live_left = np.bincount(c_arm[state == 0], minlength=k)
        self.arms_ = pl.DataFrame({
            "cluster": labels.astype(np.int64), "reward_sum": reward_sum, "pulls": pulls, "direct_pulls": direct,
            "cursor": cursor, "size": size, "exhausted": live_left == 0,
        }, schema=ARMS_SCHEMA)
        self.tau_, self.alpha_, self.tau_quantile_ = float(tau), float(alpha), float(q_tau)
        self.n_rounds_, self.n_fill_, self.stop_reason_ = n_rounds, n_fill, stop
        self.n_probed_ = int(np.unique(p_docs).size)
        self.n_docs_ = head.n_docs
        self.rejected_ = cand[state == 2]  # candidates of rejected blocks, by doc_idx
        self.tokens_selected_ = int(budget - remaining)
        self.round_tokens_ = round_tokens
        return self


def _check_bar(tau: float | None, tau_quantile: float | None, alpha: float | None) -> None:
    """The acceptance bar's parameters, as both bandits take them (None: calibrated in round 0)."""
    if tau_quantile is not None and not 0.0 <= tau_quantile <= 1.0:
        raise ValueError(f"tau_quantile must be in [0, 1], got {tau_quantile!r}")
    if alpha is not None and not alpha >= 0:
        raise ValueError(f"alpha must be None or >= 0, got {alpha!r}")
    if tau is not None and not np.isfinite(tau):
        raise ValueError(f"tau must be None or finite, got {tau!r}")


def _record_pull(rows: dict[str, list[Any]], rnd: int, cluster: int, ucb: float, mean: float, reward: float,
                 block_start: int, block_docs: int, tokens: int) -> None:
    """Append one pulled arm of one round to the ROUNDS_SCHEMA columns."""
    for name, value in (("round", rnd), ("cluster", cluster), ("ucb", ucb), ("mean_probe", mean), ("reward", reward),
                        ("accepted", reward > 0), ("block_start", block_start), ("block_docs", block_docs),
                        ("tokens_accepted", tokens)):
        rows[name].append(value)


def _share_rewards(share: sp.csr_matrix, pulled: np.ndarray, rewards: np.ndarray, reward_sum: np.ndarray,
                   pulls: np.ndarray) -> None:
    """Quad's reward sharing, in place: R_i += sum_j (1 - d_ji/gamma) r_j and T_i += sum_j (1 - d_ji/gamma)."""
    r_vec = np.zeros(reward_sum.size)
    r_vec[pulled] = rewards
    hit = np.zeros(reward_sum.size)
    hit[pulled] = 1.0
    reward_sum += share.T @ r_vec
    pulls += share.T @ hit


def _checked_pool(clusters: np.ndarray, tokens: np.ndarray, budget_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(clusters, tokens as int64), checked: one integer label and token count >= 0 per document."""
    clusters = np.asarray(clusters).ravel()
    tokens = np.asarray(tokens).ravel()
    if clusters.shape != tokens.shape:
        raise ValueError(f"clusters has {clusters.size} entries, tokens {tokens.size}")
    if clusters.size == 0:
        raise ValueError("clusters is empty: there is nothing to select from")
    _check_labels_and_tokens(clusters, tokens)
    if budget_tokens < 0:
        raise ValueError(f"budget_tokens must be >= 0, got {budget_tokens!r}")
    return clusters, tokens.astype(np.int64, copy=False)


def _check_labels_and_tokens(clusters: np.ndarray, tokens: np.ndarray) -> None:
    """Integer cluster labels and integer token counts >= 0 (non-empty arrays)."""
    if not np.issubdtype(clusters.dtype, np.integer):
        raise ValueError(f"cluster labels must be integers, got dtype {clusters.dtype}")
    if not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0:
        raise ValueError(f"tokens must be integers >= 0, got dtype {tokens.dtype}, min {tokens.min()!r}")


def _calibration_groups(rng: np.random.Generator, n: int, m: int, groups: int) -> np.ndarray:
    """(groups, min(m, n)) random pool documents; distinct across groups when the pool allows."""
    per = min(m, n)
    if groups * per <= n:
        return rng.choice(n, size=groups * per, replace=False).reshape(groups, per)
    return np.stack([rng.choice(n, size=per, replace=False) for _ in range(groups)])


def _probe(probe_fn: ProbeFn, idx: np.ndarray) -> np.ndarray:
    """Scores for `idx` from the scorer, checked: one finite float per document."""
    scores = np.asarray(probe_fn(idx), dtype=np.float64)
    if scores.shape != idx.shape:
        raise ValueError(f"probe_fn returned shape {scores.shape} for {idx.size} documents")
    if not np.isfinite(scores).all():
        bad = int(idx[~np.isfinite(scores)][0])
        raise ValueError(f"probe_fn returned a non-finite score for doc {bad}: {scores[idx == bad][0]!r}")
    return scores


def _neighbour_matrix(labels: np.ndarray, neighbors: pl.DataFrame | None, gamma: float | None) -> sp.csr_matrix:
    """(k, k) sharing weights 1 - d/gamma for neighbour pairs with d < gamma (row: puller, col: receiver)."""
    k = labels.size
    if neighbors is None or neighbors.height == 0:
        return sp.csr_matrix((k, k))
    if gamma is None or not gamma > 0:
        raise ValueError(f"gamma must be > 0 when neighbours are given, got {gamma!r}")
    nb = (
        neighbors.select(pl.col("cluster").cast(pl.Int64), pl.col("neighbor").cast(pl.Int64),
                         pl.col("distance").cast(pl.Float64))
        .filter((pl.col("cluster") != pl.col("neighbor")) & (pl.col("distance") < gamma))
        .group_by("cluster", "neighbor").agg(pl.col("distance").min())
        .sort("cluster", "neighbor")
    )
    src, dst = nb["cluster"].to_numpy(), nb["neighbor"].to_numpy()
    i, j = np.searchsorted(labels, src), np.searchsorted(labels, dst)
    i, j = np.minimum(i, k - 1), np.minimum(j, k - 1)
    known = (labels[i] == src) & (labels[j] == dst)  # pairs with an empty cluster share nothing
    w = 1.0 - nb["distance"].to_numpy() / gamma
    return sp.csr_matrix((w[known], (i[known], j[known])), shape=(k, k))


# --------------------------------------------------------------------------------------------
# Core: one entry point per selector, returning the rows the task writes
# --------------------------------------------------------------------------------------------


def run_selector(settings: SelectSettings, seed: int, tokens: np.ndarray, clusters: np.ndarray,
                 scores: np.ndarray | None = None, neighbors: pl.DataFrame | None = None,
                 gamma: float | None = None, log_weights: np.ndarray | None = None,
                 probe: Probe | None = None, rank_scores: np.ndarray | None = None,
                 novelty: Novelty | None = None, theta: float | None = None,
                 theta_likely: float | None = None,
                 progress: Callable[[int], None] | None = None) -> dict[str, pl.DataFrame]:
    """Run the configured selector; frames for select_selection and select_info (+ rounds/probes/arms for quad).

    `scores`: the pool-wide score top-k takes and the bandit's probes look up (none for an on-demand
    `probe`). Ranked blocks also need `rank_scores` and `novelty`, and `theta` / `theta_likely` (the
    scores of the target's own kind, from the classifier) for the target tiers; without `scores` or
    `probe` they probe by looking up the rank score. `progress(tokens)`: ranked blocks report each
    round's accepted tokens to it.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    clusters = np.asarray(clusters, dtype=np.int64)
    budget = settings.budget_tokens
    info = _blank_info(tokens.size)
    out: dict[str, pl.DataFrame] = {}
    selector = settings.selector
    if selector == "quad":
        ranked = settings.blocks == "ranked"
        if ranked and (rank_scores is None or novelty is None):
            raise ValueError("quad with ranked blocks needs rank_scores and novelty")
        probe_is_rank = ranked and probe is None and (scores is None or scores is rank_scores)
        if probe is None:
            if scores is None and not ranked:
                raise ValueError("selector 'quad' needs scores or a probe scorer")
            probe = Probe.lookup(rank_scores if scores is None else scores)
        if probe.n_docs != tokens.size:
            raise ValueError(f"the probe scorer covers {probe.n_docs} documents, the pool has {tokens.size}")
        if ranked:
            clusters, tokens = _checked_pool(clusters, tokens, budget)
            rank_scores = np.asarray(rank_scores, dtype=np.float64).ravel()
            if rank_scores.shape != tokens.shape:
                raise ValueError(f"rank_scores has {rank_scores.size} entries, tokens {tokens.size}")
            return run_ranked(settings, seed, array_pool(tokens, clusters, rank_scores), novelty, probe, theta,
                              theta_likely, probe_is_rank, neighbors, gamma, progress)
        bandit = QuadBandit.from_settings(settings, seed).fit(clusters, tokens, budget, probe, neighbors, gamma)
        info.update(block_docs=bandit.block_docs_)
        _bandit_info(info, settings, bandit, probe)
        out.update(rounds=bandit.rounds_, probes=bandit.probes_, arms=bandit.arms_)
        chosen, reasons = bandit.selected_, bandit.reasons_
        rounds = np.where(bandit.rounds_of_ == FILL_ROUND, None, bandit.rounds_of_)  # fill: no round
    else:
        if selector == "random":
            chosen = select_random(tokens, budget, seed)
        elif selector == "topk":
            if scores is None:
                raise ValueError("selector 'topk' needs scores")
            chosen = select_topk(scores, tokens, budget)
        elif selector == "dsir":
            if log_weights is None:
                raise ValueError("selector 'dsir' needs log_weights")
            chosen = select_dsir(log_weights, tokens, budget, seed, settings.dsir_min_tokens)
            info.update(dsir_min_tokens=settings.dsir_min_tokens)
        else:
            raise ValueError(f"unknown selector {selector!r}")
        reasons = np.full(chosen.size, selector, dtype=object)
        rounds = np.full(chosen.size, None, dtype=object)
    return _selector_frames(out, settings, info, chosen, clusters[chosen], int(tokens[chosen].sum()), rounds, reasons)


def run_ranked(settings: SelectSettings, seed: int, pool: PoolScan, novelty: Novelty, probe: Probe | None = None,
               theta: float | None = None, theta_likely: float | None = None, probe_is_rank: bool = True,
               neighbors: pl.DataFrame | None = None, gamma: float | None = None,
               progress: Callable[[int], None] | None = None) -> dict[str, pl.DataFrame]:
    """run_selector's frames for quad with ranked blocks over a pool scan: what the select stage runs by default.

    `probe` None: the probes look up the pool batches' probe score, or their rank score.
    """
    bandit = TwoLevelQuad.from_settings(settings, seed).fit_pool(
        pool, settings.budget_tokens, novelty, probe, theta, theta_likely, probe_is_rank, neighbors, gamma, progress)
    info = _blank_info(bandit.n_docs_)
    info.update(bandit.tiers_)
    info.update(round_tokens=bandit.round_tokens_, rank_scorer=settings.rank_scorer)
    _bandit_info(info, settings, bandit, bandit.probe_)
    out = {"rounds": bandit.rounds_, "probes": bandit.probes_, "arms": bandit.arms_}
    rounds = np.where(bandit.rounds_of_ == FILL_ROUND, None, bandit.rounds_of_)  # fill: no round
    if bandit.fill_scans_:
        get_logger().info(f"select: the fill scanned the pool {bandit.fill_scans_} more time(s) for documents "
                          "ranked after the candidates")
    return _selector_frames(out, settings, info, bandit.selected_, bandit.selected_clusters_,
                            bandit.tokens_selected_, rounds, bandit.reasons_)


def _blank_info(pool_docs: int) -> dict[str, Any]:
    info: dict[str, Any] = dict.fromkeys(("blocks", "tau", "tau_quantile", "alpha", "block_docs", "rounds",
                                          "docs_probed", "stop", "probe_scorer", "docs_scored", "probe_seconds"))
    info["pool_docs"] = int(pool_docs)
    return info


def _bandit_info(info: dict[str, Any], settings: SelectSettings, bandit: "QuadBandit | TwoLevelQuad",
                 probe: Probe) -> None:
    info.update(blocks=settings.blocks, tau=bandit.tau_, tau_quantile=bandit.tau_quantile_, alpha=bandit.alpha_,
                rounds=bandit.n_rounds_, docs_probed=bandit.n_probed_, stop=bandit.stop_reason_,
                probe_scorer=settings.probe_scorer, docs_scored=probe.docs_scored_,
                probe_seconds=round(probe.seconds_, 3))


def _selector_frames(out: dict[str, pl.DataFrame], settings: SelectSettings, info: dict[str, Any],
                     chosen: np.ndarray, chosen_clusters: np.ndarray, tokens_selected: int, rounds: np.ndarray,
                     reasons: np.ndarray) -> dict[str, pl.DataFrame]:
    """`out` with the selection (in selection order) and info frames added."""
    budget = settings.budget_tokens
    out["selection"] = pl.DataFrame({
        "doc_idx": chosen.astype(np.int64),
        "rank": np.arange(chosen.size, dtype=np.int64),
        "cluster": np.asarray(chosen_clusters, dtype=np.int64),
        "round": pl.Series(rounds.tolist(), dtype=pl.Int32),
        "reason": pl.Series(reasons.tolist(), dtype=pl.String),
    })
    info.update(selector=settings.selector, budget_tokens=budget, tokens_selected=tokens_selected,
                docs_selected=int(chosen.size), fill_fraction=tokens_selected / budget)
    out["info"] = pl.DataFrame({
        "name": list(info), "value": [None if v is None else str(v) for v in info.values()],
    }, schema={"name": pl.String, "value": pl.String})
    return out


# --------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------

_TABLES = {"rounds": "select_insert_rounds", "probes": "select_insert_probes",
           "selection": "select_insert_selection", "arms": "select_insert_arms", "info": "select_insert_info"}


def run_on_kept(keep: np.ndarray, settings: SelectSettings, seed: int, tokens: np.ndarray, clusters: np.ndarray,
                **kwargs: Any) -> dict[str, pl.DataFrame]:
    """run_selector on the documents `keep` marks (dedup dropped the rest), its doc_idx mapped back to the pool's.

    Every per-document input (tokens, clusters, scores, log_weights, rank_scores, novelty rows, probe) is cut to the kept
    documents, so the selector never sees two members of one near-duplicate component.
    """
    kept = np.flatnonzero(keep)  # (n_kept,) pool doc_idx of each position the selector sees
    if kept.size == tokens.size:
        return run_selector(settings, seed, tokens, clusters, **kwargs)
    for name in ("scores", "log_weights", "rank_scores"):
        if kwargs.get(name) is not None:
            kwargs[name] = np.asarray(kwargs[name])[kept]
    if kwargs.get("novelty") is not None:
        nov = kwargs["novelty"]
        kwargs["novelty"] = Novelty(nov.target_totals, nov.pool_totals, lambda idx: nov.rows(kept[idx]))
    if kwargs.get("probe") is not None:
        inner = kwargs["probe"]
        kwargs["probe"] = Probe(lambda idx: inner.score_fn(kept[idx]), kept.size, pool_wide=inner.pool_wide)
    frames = run_selector(settings, seed, tokens[kept], clusters[kept], **kwargs)
    return {name: frame.with_columns(doc_idx=pl.Series(kept[frame["doc_idx"].to_numpy()], dtype=frame.schema["doc_idx"]))
            if "doc_idx" in frame.columns else frame for name, frame in frames.items()}


@stage_task("select")
def select(settings: SelectSettings, docs: StageRef, features: StageRef, clusters: StageRef,
           scores: StageRef, seed: int, dedup: tuple[StageRef, ...] = ()) -> StageRef:
    """Select within the token budget and record every round, probe and accepted block.

    `dedup`: the dedup partitions (fuzzy, semantic) whose dropped documents the selector never sees.
    Quad with ranked blocks (the default) streams the pool in doc_idx ranges and keeps only its candidates;
    the other selectors read one value per pool document.
    """
    key = stage_key("select", VERSION, settings, docs, features, clusters, scores, seed, *dedup)
    log = get_logger()
    with connect(docs.store) as con:
        n_pool = int(dict(query_sql(con, "select_count_docs", {"key": docs.key}).fetchall()).get("pool", 0))
        dedup_keys = [d.key for d in dedup]
        extra: dict[str, Any] = {}
        progress = None
        if settings.selector == "quad" and settings.blocks == "ranked":
            settings = resolve_scorers(settings, ran=lambda name: _scorer_info(con, scores.key, name) is not None)
            theta, theta_likely = quad_thetas(settings, lambda: _scorer_info(con, scores.key, "classifier"))
            _warn_unused_influence(con, settings, scores.key)
            probe = None
            if settings.probe_scorer == INFLUENCE:
                probe, extra = _influence_probe(con, docs, scores, n_pool)
            probe_scorer = None if probe is not None or settings.probe_scorer == settings.rank_scorer \
                else settings.probe_scorer
            pool = _pool_scan(con, n_pool, docs.key, clusters.key, scores.key, settings.rank_scorer, probe_scorer,
                              dedup_keys)
            neighbors, gamma = _neighbors(con, clusters.key)
            progress = Progress("select", settings.budget_tokens, unit="tokens")  # rounds take seconds on big pools
            frames = run_ranked(settings, seed, pool, _novelty(con, docs.key, features.key), probe, theta,
                                theta_likely, probe is None and probe_scorer is None, neighbors, gamma,
                                progress.update)
            pool_docs = int(dict(zip(frames["info"]["name"], frames["info"]["value"]))["pool_docs"])
        else:
            tokens = _by_doc(query_sql(con, "select_read_tokens", {"key": docs.key, "lo": 0, "hi": None}),
                             "n_tokens", "ingest_docs")
            labels = _by_doc(query_sql(con, "select_read_clusters", {"key": clusters.key, "lo": 0, "hi": None}),
                             "cluster", "cluster_assignments", hi=tokens.size)
            kwargs: dict[str, Any] = {}
            if settings.selector == "topk":
                kwargs["scores"] = _pool_scores(con, scores.key, "combined", 0, tokens.size)
            if settings.selector == "quad":
                settings, kwargs = quad_inputs(
                    settings, ran=lambda name: _scorer_info(con, scores.key, name) is not None,
                    pool_scores=lambda name: _pool_scores(con, scores.key, name, 0, tokens.size),
                    classifier_params=lambda: _scorer_info(con, scores.key, "classifier"),
                    novelty=lambda: _novelty(con, docs.key, features.key))
                _warn_unused_influence(con, settings, scores.key)
                if settings.probe_scorer == INFLUENCE:
                    kwargs["probe"], extra = _influence_probe(con, docs, scores, tokens.size)
                kwargs["neighbors"], kwargs["gamma"] = _neighbors(con, clusters.key)
            if settings.selector == "dsir":
                kwargs["log_weights"] = _dsir_log_weights(con, features.key, n=tokens.size)
            keep = np.ones(tokens.size, dtype=bool)
            if dedup:
                keep[_dropped(con, dedup_keys, 0, None)] = False
            frames = run_on_kept(keep, settings, seed, tokens, labels, **kwargs)
            pool_docs = int(keep.sum())
        if progress is not None:
            progress.close()
        if dedup:
            extra.update(dedup_keys=",".join(dedup_keys), docs_dropped_by_dedup=n_pool - pool_docs)
        if extra:
            frames["info"] = pl.concat([frames["info"], pl.DataFrame(
                {"name": list(extra), "value": [str(v) for v in extra.values()]}, schema=frames["info"].schema)])

        run_sql(con, "select_create")
        with transaction(con):
            run_sql(con, "select_delete", {"key": key})
            for name, frame in frames.items():
                insert_frame(con, _TABLES[name], frame, {"key": key})
        ref = make_ref(con, "select", key, docs.store, "select_selection", ["doc_idx", "rank"])
    info = dict(zip(frames["info"]["name"], frames["info"]["value"]))
    log.info(f"select ({settings.selector}): {info['docs_selected']} docs, {info['tokens_selected']} of "
             f"{settings.budget_tokens} tokens ({float(info['fill_fraction']):.1%}), rounds={info['rounds']}, "
             f"probed={info['docs_probed']}")
    if settings.selector == "quad":
        log.info(f"select: probe scorer {info['probe_scorer']!r} scored {info['docs_scored']} of {n_pool} "
                 f"pool docs in {float(info['probe_seconds']):.1f}s")
    return ref


# Pool documents per read of the select stage's scan: about 10 MB of columns at a time.
READ_DOCS = 1 << 18


def _pool_scan(con, n_pool: int, docs_key: str, clusters_key: str, scores_key: str, rank_scorer: str,
               probe_scorer: str | None, dedup_keys: list[str]) -> PoolScan:
    """The pool as the two-level bandit scans it: READ_DOCS documents at a time, dedup's dropped ones left out.

    Each range's token counts, cluster labels and scores are checked to cover its doc_idx exactly once.
    """
    read_docs = READ_DOCS

    def scan() -> Iterator[PoolBatch]:
        for lo in range(0, n_pool, read_docs):
            hi = min(lo + read_docs, n_pool)
            span = {"lo": lo, "hi": hi}
            tokens = _by_doc(query_sql(con, "select_read_tokens", {"key": docs_key, **span}), "n_tokens",
                             "ingest_docs", lo, hi)
            labels = _by_doc(query_sql(con, "select_read_clusters", {"key": clusters_key, **span}), "cluster",
                             "cluster_assignments", lo, hi)
            batch = PoolBatch(np.arange(lo, hi, dtype=np.int64), tokens.astype(np.int64), labels.astype(np.int64),
                              _pool_scores(con, scores_key, rank_scorer, lo, hi),
                              None if probe_scorer is None else _pool_scores(con, scores_key, probe_scorer, lo, hi))
            if dedup_keys:
                keep = np.ones(hi - lo, dtype=bool)
                keep[_dropped(con, dedup_keys, lo, hi) - lo] = False
                batch = batch.take(keep)
            yield batch

    return scan


def _dropped(con, dedup_keys: list[str], lo: int, hi: int | None) -> np.ndarray:
    """doc_idx in [lo, hi) that the dedup partitions dropped (hi None: to the end)."""
    cols = query_sql(con, "select_read_dropped", {"keys": dedup_keys, "lo": lo, "hi": hi}).fetchnumpy()
    return np.asarray(cols["doc_idx"], dtype=np.int64)


def _neighbors(con, clusters_key: str) -> tuple[pl.DataFrame, float]:
    """The cluster partition's neighbour pairs and its radius gamma, for reward sharing."""
    neighbors = query_sql(con, "select_read_neighbors", {"key": clusters_key}).pl()
    row = query_sql(con, "select_read_gamma", {"key": clusters_key}).fetchone()
    if row is None:
        raise ValueError(f"cluster_info has no row for cluster partition {clusters_key!r}")
    return neighbors, row[0]


def resolve_scorers(settings: SelectSettings, ran: Callable[[str], bool]) -> SelectSettings:
    """The select settings with 'auto' rank and probe scorers resolved; `ran(name)`: did the score stage run it."""
    rank = settings.rank_scorer or ("classifier" if ran("classifier") else "combined")
    probe = settings.probe_scorer or (rank if settings.blocks == "ranked" else "combined")
    return settings.model_copy(update={"rank_scorer": rank, "probe_scorer": probe})


def quad_inputs(settings: SelectSettings, ran: Callable[[str], bool], pool_scores: Callable[[str], np.ndarray],
                classifier_params: Callable[[], dict | None], novelty: Callable[[], Novelty]
                ) -> tuple[SelectSettings, dict[str, Any]]:
    """quad's settings with 'auto' scorers resolved, and what run_selector needs besides an on-demand probe.

    `pool_scores(name)`: one pool-wide scorer's scores; `classifier_params()`: its score_info params
    (None if it did not run); `novelty()`: the n-gram distributions. Ranked blocks get rank scores,
    novelty and, ranking by the classifier, theta and theta_likely (scores of the target's own kind); probes look up
    a pool-wide score unless they are the rank score itself or 'influence' (scored on demand).
    """
    settings = resolve_scorers(settings, ran)
    kwargs: dict[str, Any] = {}
    if settings.blocks == "ranked":
        kwargs["rank_scores"] = pool_scores(settings.rank_scorer)
        kwargs["novelty"] = novelty()
        if settings.rank_scorer == "classifier":
            kwargs["theta"], kwargs["theta_likely"] = quad_thetas(settings, classifier_params)
    if settings.probe_scorer != INFLUENCE and (settings.blocks == "random"
                                               or settings.probe_scorer != settings.rank_scorer):
        kwargs["scores"] = pool_scores(settings.probe_scorer)
    return settings, kwargs


def quad_thetas(settings: SelectSettings, classifier_params: Callable[[], dict | None]
                ) -> tuple[float | None, float | None]:
    """(theta, theta_likely): the classifier scores most and nearly all of the target's own documents reach,
    when ranked blocks rank by the classifier (None, None otherwise)."""
    from quadflow.tasks.scorers.classifier import target_quantile

    if settings.rank_scorer != "classifier":
        return None, None
    params = classifier_params()
    if params is None:
        raise ConfigError("select.rank_scorer = 'classifier', but the score stage did not run it: add it "
                          "to score.scorers")
    return target_quantile(params, settings.target_quantile), target_quantile(params, settings.likely_quantile)


def _novelty(con, docs_key: str, features_key: str) -> Novelty:
    """The n-gram distributions the novelty discount uses; rows are read for the candidates only."""
    from quadflow.tasks.score import pool_ngram_totals, read_pool_rows

    n_buckets, pool_totals = pool_ngram_totals(con, features_key)
    counts = dict(query_sql(con, "select_count_docs", {"key": docs_key}).fetchall())
    if int(counts.get("target", 0)):
        target_totals = np.asarray(load_ngrams(con, features_key, "target", n_buckets).sum(axis=0)).ravel()
    else:  # no target: diversity means covering the pool's own n-gram distribution
        target_totals = pool_totals
    return Novelty(target_totals, pool_totals, lambda idx: read_pool_rows(con, features_key, idx, n_buckets))


def _pool_scores(con, scores_key: str, scorer: str, lo: int, hi: int) -> np.ndarray:
    """One pool-wide scorer's score per pool document with doc_idx in [lo, hi), from the score partition."""
    result = query_sql(con, "select_read_scores", {"key": scores_key, "scorer": scorer, "lo": lo, "hi": hi})
    try:
        return _by_doc(result, "score", f"score_docs (scorer {scorer!r})", lo, hi).astype(np.float64)
    except ValueError as e:
        if _scorer_info(con, scores_key, scorer) is not None:
            raise
        if scorer == "combined":  # e.g. score.scorers = ['influence']: nothing is scored pool-wide
            raise ConfigError(f"no combined scores: {e}; the combined score needs a pool-wide scorer (heuristic, "
                              "dsir, classifier) in score.scorers, or probe with select.probe_scorer = 'influence'"
                              ) from None
        raise ConfigError(f"select.probe_scorer = {scorer!r}, but the score stage did not run it: {e}; "
                          f"add {scorer!r} to score.scorers") from None


def _scorer_info(con, scores_key: str, scorer: str) -> dict[str, Any] | None:
    """A scorer's score_info params in a score partition; None if it did not run (or nothing was scored yet)."""
    try:
        row = query_sql(con, "select_read_scorer_info", {"key": scores_key, "scorer": scorer}).fetchone()
    except duckdb.CatalogException:  # no score_info table: a store whose score stage wrote nothing
        return None
    return None if row is None else json.loads(row[0])


def _warn_unused_influence(con, settings: SelectSettings, scores_key: str) -> None:
    if settings.probe_scorer != INFLUENCE and _scorer_info(con, scores_key, INFLUENCE) is not None:
        get_logger().warning(f"select: the score stage fitted the influence scorer, but the bandit probes with "
                             f"{settings.probe_scorer!r}; set select.probe_scorer = 'influence' to use it")


def _influence_probe(con, docs: StageRef, scores: StageRef, n_pool: int) -> tuple[Probe, dict[str, Any]]:
    """An on-demand influence probe: the score stage's fitted state, loaded once (refitted if the file is
    gone), scoring each round's probed documents in one batched query and one batched call."""
    from quadflow.tasks.score import ensure_influence_state, influence_state_path
    from quadflow.tasks.scorers.influence import InfluenceUnavailable

    params = _scorer_info(con, scores.key, INFLUENCE)
    if params is None:
        raise ConfigError(f"select.probe_scorer = 'influence', but score partition {scores.key!r} has no fitted "
                          "influence scorer: add 'influence' to score.scorers")
    try:
        from quadflow.tasks.scorers.influence.fitted import device_of, load_fitted, sha256_file, torch_threads
    except InfluenceUnavailable as e:
        raise ConfigError(str(e)) from None
    settings = InfluenceSettings.model_validate(params["settings"])
    path = influence_state_path(docs.store.path, scores.key)  # beside the store wherever it has moved
    if not path.is_file():
        get_logger().warning(f"select: fitted influence state {path} is missing; refitting it as the score stage did")
        counts = dict(query_sql(con, "select_count_docs", {"key": docs.key}).fetchall())
        ensure_influence_state(con, settings, docs.key, n_pool, int(counts.get("target", 0)),
                               int(params["random_state"]), path)
    sha = sha256_file(path)
    if sha != params.get("sha256"):
        get_logger().warning(f"select: influence state {path} has sha256 {sha[:12]}, score_info recorded "
                             f"{str(params.get('sha256'))[:12]} (refitted since)")
    scorer, _ = load_fitted(path, device=device_of(settings))
    max_chars = int(params["max_chars"])

    def score_fn(idx: np.ndarray) -> np.ndarray:
        texts = _probe_texts(con, docs.key, idx, max_chars)
        with torch_threads(settings.threads):
            return scorer.score(texts, progress=False)

    return Probe(score_fn, n_pool), {"probe_version": scorer.get_params()["version"], "probe_state": str(path),
                                     "probe_state_sha256": sha}


def _probe_texts(con, docs_key: str, idx: np.ndarray, max_chars: int) -> list[str]:
    """Texts (first max_chars characters) of one round's probed pool documents, in the order of idx."""
    cols = query_sql(con, "select_read_probe_texts", {"key": docs_key, "idx": idx.tolist(),
                                                      "max_chars": max_chars}).fetchnumpy()
    got = np.asarray(cols["doc_idx"], dtype=np.int64)
    order = np.argsort(got)
    pos = np.searchsorted(got, idx, sorter=order)
    pos = np.minimum(pos, max(got.size - 1, 0))
    if got.size == 0 or not np.array_equal(got[order[pos]], idx):
        raise ValueError(f"ingest_docs {docs_key}/pool lacks some probed documents (doc_idx {idx[:5].tolist()}...)")
    texts = cols["text"]
    return [texts[i] for i in order[pos]]


def _by_doc(result, column: str, table: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """One value per pool document, checked to cover doc_idx lo..hi-1 exactly once, in order (hi None: a
    whole pool, however many rows it holds)."""
    cols = result.fetchnumpy()
    doc_idx, values = np.asarray(cols["doc_idx"]), np.asarray(cols[column])
    expected = doc_idx.size if hi is None else hi - lo
    if doc_idx.size != expected or not np.array_equal(doc_idx, np.arange(lo, lo + expected)):
        raise ValueError(f"{table} holds {doc_idx.size} rows for pool doc_idx {lo}..{lo + expected - 1}, expected "
                         "one per doc_idx")
    if doc_idx.size == 0:
        raise ValueError(f"{table} holds no rows for this partition")
    return values


def _dsir_log_weights(con, features_key: str, n: int) -> np.ndarray:
    """DSIR log importance weights of the pool: fitted on the target's and the pool's hashed n-grams."""
    target = load_ngrams(con, features_key, "target")
    pool = load_ngrams(con, features_key, "pool")
    if pool.shape[0] != n:
        raise ValueError(f"featurize_ngrams holds {pool.shape[0]} pool rows for partition {features_key!r}, "
                         f"expected {n}")
    return np.asarray(DSIR().fit(target, pool).log_weights(pool), dtype=np.float64)
