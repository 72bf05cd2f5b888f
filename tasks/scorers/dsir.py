"""DSIR importance: how much more likely a document's hashed n-grams are under the target.

Xie et al. 2023, "Data Selection for Language Models via Importance Resampling"
(arXiv:2302.03169): fit bag-of-hashed-n-gram distributions p_target and p_raw (Laplace
smoothed), weigh each raw document by log p_target(x) - log p_raw(x) = sum over its n-grams of
count * (log p_t - log p_r), and resample k documents without replacement with Gumbel top-k.

The estimator has the dsir package's three public steps (fit, log_weights/weights, resample);
the select stage's dsir baseline calls fit + log_weights + gumbel_keys. The scorer divides the
log weight by the document's n-gram count (mean log ratio per n-gram), so a long document is
not ranked first merely for being long.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from quadflow.tasks.scorers import FitInput, ScoreInput, Scorer, Scores, register

VERSION = "dsir-2"  # 2: bucket totals summed exactly in float64 (were float32)


def _row_sums(counts: sparse.spmatrix) -> np.ndarray:
    return np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()


def gumbel_keys(log_w: np.ndarray, seed: int) -> np.ndarray:
    """log w + Gumbel(0, 1) noise from a seeded generator: the top-k keys are a sample without
    replacement with probability proportional to w (Gumbel-max trick)."""
    log_w = np.asarray(log_w, dtype=np.float64)
    return log_w + np.random.default_rng(seed).gumbel(size=log_w.shape)


class DSIR:
    """Hashed n-gram importance weights between a target set and a raw pool."""

    def __init__(self, smoothing: float = 1.0):
        self.smoothing = smoothing  # pseudo-count per bucket (1.0 = add-one / Laplace, as in DSIR)

    def fit(self, target_counts: sparse.spmatrix, raw_counts: sparse.spmatrix) -> "DSIR":
        """Fit p_target and p_raw over the buckets from (n_docs, n_buckets) count matrices."""
        if target_counts.shape[1] != raw_counts.shape[1]:
            raise ValueError(
                f"target has {target_counts.shape[1]} buckets, raw has {raw_counts.shape[1]}: "
                "they must come from one hashed space"
            )
        if target_counts.shape[0] == 0:
            raise ValueError("DSIR needs at least one target document, got 0")
        return self.fit_totals(np.asarray(target_counts.sum(axis=0, dtype=np.float64)).ravel(),
                               np.asarray(raw_counts.sum(axis=0, dtype=np.float64)).ravel())

    def fit_totals(self, target_totals: np.ndarray, raw_totals: np.ndarray) -> "DSIR":
        """Fit from (n_buckets,) n-gram totals: what a pool too big for memory is summarized by."""
        if not self.smoothing > 0:
            raise ValueError(f"smoothing must be > 0 (it keeps every log p finite), got {self.smoothing!r}")
        if target_totals.shape != raw_totals.shape:
            raise ValueError(f"target has {target_totals.shape} buckets, raw has {raw_totals.shape}: "
                             "they must come from one hashed space")
        t = np.asarray(target_totals, dtype=np.float64) + self.smoothing  # (B,)
        r = np.asarray(raw_totals, dtype=np.float64) + self.smoothing  # (B,)
        self.n_buckets_ = int(t.size)
        self.log_p_target_ = np.log(t) - np.log(t.sum())  # (B,)
        self.log_p_raw_ = np.log(r) - np.log(r.sum())  # (B,)
        self.log_ratio_ = self.log_p_target_ - self.log_p_raw_  # (B,) nats per n-gram occurrence
        return self

    def _check_fitted(self, counts: sparse.spmatrix) -> None:
        if not hasattr(self, "log_ratio_"):
            raise ValueError("DSIR is not fitted: call fit(target_counts, raw_counts) first")
        if counts.shape[1] != self.n_buckets_:
            raise ValueError(f"counts have {counts.shape[1]} buckets, DSIR was fitted on {self.n_buckets_}")

    def log_weights(self, counts: sparse.spmatrix) -> np.ndarray:
        """log p_target(x) - log p_raw(x) per document: (n_docs,) float64, what DSIR resamples on."""
        self._check_fitted(counts)
        return np.asarray(counts @ self.log_ratio_, dtype=np.float64).ravel()  # (n_docs,)

    def weights(self, counts: sparse.spmatrix) -> np.ndarray:
        """Importance weights normalized to sum to 1 (computed in log space, so no overflow)."""
        lw = self.log_weights(counts)
        if lw.size == 0:
            return lw
        w = np.exp(lw - lw.max())
        return w / w.sum()

    def resample(self, log_weights: np.ndarray, k: int, random_state: int) -> np.ndarray:
        """Indices of k documents drawn without replacement with p ~ exp(log_weights), best key first."""
        log_weights = np.asarray(log_weights, dtype=np.float64)
        if not 0 <= k <= log_weights.size:
            raise ValueError(f"k must be in [0, {log_weights.size}] (the number of documents), got {k!r}")
        keys = gumbel_keys(log_weights, random_state)
        order = np.lexsort((np.arange(keys.size), -keys))  # highest key first, ties by index
        return order[:k]

    def kl_target_raw(self) -> float:
        """KL(p_target || p_raw) in nats over the buckets: how far the pool is from the target."""
        return float(np.sum(np.exp(self.log_p_target_) * self.log_ratio_))


@register
class DSIRScorer(Scorer):
    """Mean per-n-gram log importance ratio: target-likeness independent of length."""

    name = "dsir"
    VERSION = VERSION
    needs = frozenset({"ngrams", "target_ngrams"})

    def __init__(self, random_state: int = 0, smoothing: float = 1.0):
        super().__init__(random_state=random_state)
        self.smoothing = smoothing

    def fit(self, data: FitInput) -> "DSIRScorer":
        target = data.require("target_ngrams", self.name)
        if target.shape[0] == 0:
            raise ValueError("DSIR needs at least one target document, got 0")
        totals = data.require("pool_totals", self.name)
        self.model_ = DSIR(smoothing=self.smoothing).fit_totals(
            np.asarray(target.sum(axis=0, dtype=np.float64)).ravel(), totals)
        self.params_ = {
            "smoothing": self.smoothing,
            "n_buckets": self.model_.n_buckets_,
            "target_docs": int(target.shape[0]),
            "target_ngrams": float(target.sum()),
            "pool_ngrams": float(totals.sum()),
            "docs_without_ngrams": int(data.empty_docs),
            "kl_target_raw": self.model_.kl_target_raw(),
        }
        return self

    def apply(self, data: ScoreInput) -> Scores:
        pool = data.require("ngrams", self.name)
        log_w = self.model_.log_weights(pool)  # (n_docs,) nats
        n_grams = _row_sums(pool)  # (n_docs,)
        score = np.divide(log_w, n_grams, out=np.zeros_like(log_w), where=n_grams > 0)
        return Scores(score=score, params=self.params_)
