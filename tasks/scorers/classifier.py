"""Classifier quality: a linear model of "looks like the target" on hashed n-grams (DCLM-style).

Li et al. 2024, "DataComp-LM" (arXiv:2406.11794), score documents with a fastText classifier
trained on reference (positive) vs. random pool (negative) text. Here: the same idea with the
hashed word 1+2-gram counts the featurize stage already stores, features log1p(count) with
each row L2-normalized, and a seeded, class-balanced logistic regression.

Positives: every target document. Negatives: a seeded sample of `negatives` pool documents drawn
without replacement in proportion to their tokens (`negatives_by = 'tokens'`), so the model
learns what separates the target from the pool's *text* rather than from its many tiny records:
on the Debian pool, where dictionary entries are 70% of the documents and 10% of the tokens,
document-uniform negatives made the model prefer long manuals of any kind (BENCHMARKS.md,
"Selection quality": top-k held-out perplexity 85.6 -> 81.0 on python-docs, 305 -> 278 on
postgres-transfer). `negatives_by = 'documents'` draws them uniformly, as DCLM does.

The model fitted on every positive and negative is the one that scores. Five seeded folds give
each target document an out-of-fold score; their token-weighted quantiles (`target_quantiles` in
score_info) say what score a target document typically gets from a model that did not see it,
which is how the select stage recognises pool documents of the target's own kind. The held-out
accuracy in score_info is the folds' accuracy over positives and negatives. The sampled negatives
are also scored; their scores are slightly pessimistic (the model saw them), which matters little
when the pool is much larger than the sample.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import normalize

from quadflow.tasks.scorers import FitInput, ScoreInput, Scorer, Scores, register

VERSION = "classifier-2"  # 2: negatives by tokens, a fixed number of them, out-of-fold target quantiles
_SCORE_ROWS = 65_536  # documents featurized per decision_function call
FOLDS = 5
# Token-weighted quantiles of the target's out-of-fold scores kept in score_info: 0.00, 0.01, ..., 1.00.
QUANTILE_GRID = np.round(np.linspace(0.0, 1.0, 101), 2)


def hashed_features(counts: sparse.spmatrix) -> sparse.csr_matrix:
    """log1p(counts), rows L2-normalized: (n_docs, n_buckets) float64, dampens repeated n-grams."""
    x = sparse.csr_matrix(counts, dtype=np.float64, copy=True)
    np.log1p(x.data, out=x.data)
    return normalize(x, norm="l2", copy=False)


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Quantiles of `values` where each value counts `weights` times (inverse of the weighted CDF)."""
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if values.size == 0:
        raise ValueError("weighted_quantiles of no values")
    if weights.shape != values.shape or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"weights must be {values.shape} non-negative numbers with a positive sum")
    order = np.argsort(values, kind="stable")
    cdf = np.cumsum(weights[order]) / weights.sum()  # (n,) share of the weight at or below each value
    pos = np.minimum(np.searchsorted(cdf, np.asarray(qs, dtype=np.float64), side="left"), values.size - 1)
    return values[order][pos]


class HashedNgramClassifier:
    """Target (1) vs. pool (0) logistic regression on hashed n-gram features."""

    def __init__(self, negatives: int = 5000, negatives_by: str = "tokens", C: float = 1.0, max_iter: int = 2000,
                 folds: int = FOLDS, random_state: int = 0):
        self.negatives = negatives
        self.negatives_by = negatives_by
        self.C = C
        self.max_iter = max_iter
        self.folds = folds
        self.random_state = random_state

    def fit(self, target_counts: sparse.spmatrix, pool_counts: sparse.spmatrix,
            pool_tokens: np.ndarray | None = None) -> "HashedNgramClassifier":
        """Sample negatives from the pool, score the target out of fold, fit on everything."""
        if target_counts.shape[1] != pool_counts.shape[1]:
            raise ValueError(f"target has {target_counts.shape[1]} buckets, pool has {pool_counts.shape[1]}")
        pool_counts = sparse.csr_matrix(pool_counts)
        return self.fit_rows(target_counts, pool_counts.shape[0], lambda idx: pool_counts[idx], pool_tokens)

    def sample_negatives(self, n_pool: int, pool_tokens: np.ndarray | None) -> np.ndarray:
        """Sorted doc_idx of the negatives: `negatives` pool documents, by tokens or uniformly, seeded."""
        if self.negatives < 1:
            raise ValueError(f"negatives must be >= 1, got {self.negatives!r}")
        if self.negatives_by not in ("tokens", "documents"):
            raise ValueError(f"negatives_by must be 'tokens' or 'documents', got {self.negatives_by!r}")
        rng = np.random.default_rng(self.random_state)
        if self.negatives_by == "documents":
            return np.sort(rng.choice(n_pool, size=min(self.negatives, n_pool), replace=False))
        if pool_tokens is None or len(pool_tokens) != n_pool:
            raise ValueError(f"negatives_by = 'tokens' needs the token count of each of the {n_pool} pool documents")
        w = np.asarray(pool_tokens, dtype=np.float64)
        n = min(self.negatives, int(np.count_nonzero(w)))
        if n == 0:
            raise ValueError("every pool document has 0 tokens: no negatives to sample by tokens")
        return np.sort(rng.choice(n_pool, size=n, replace=False, p=w / w.sum()))

    def fit_rows(self, target_counts: sparse.spmatrix, n_pool: int, pool_rows,
                 pool_tokens: np.ndarray | None = None) -> "HashedNgramClassifier":
        """fit() for a pool read row by row: `pool_rows(idx)` gives the (len(idx), B) counts of sorted doc_idx."""
        n_target = target_counts.shape[0]
        if n_target == 0 or n_pool == 0:
            raise ValueError(f"the classifier needs target and pool documents, got {n_target} and {n_pool}")
        self.negative_idx_ = self.sample_negatives(n_pool, pool_tokens)  # (n_neg,) pool doc_idx
        negatives = sparse.csr_matrix(pool_rows(self.negative_idx_))
        if negatives.shape[1] != target_counts.shape[1]:
            raise ValueError(f"target has {target_counts.shape[1]} buckets, pool has {negatives.shape[1]}")
        n_neg = negatives.shape[0]
        x = sparse.vstack([hashed_features(target_counts), hashed_features(negatives)],
                          format="csr")  # (n_target + n_neg, B)
        y = np.r_[np.ones(n_target, dtype=np.int8), np.zeros(n_neg, dtype=np.int8)]
        target_weight = np.asarray(target_counts.sum(axis=1), dtype=np.float64).ravel()  # n-grams ~ tokens

        # Out-of-fold scores: each target document scored by a model fitted without it.
        folds = min(self.folds, n_target, n_neg)
        self.n_positive_, self.n_negative_ = int(n_target), int(n_neg)
        self.target_oof_ = None
        self.held_out_accuracy_ = self.held_out_balanced_accuracy_ = None
        if folds >= 2:
            oof = np.empty(y.size)
            split = StratifiedKFold(folds, shuffle=True, random_state=self.random_state)
            for train, test in split.split(np.zeros(y.size), y):
                oof[test] = self._model().fit(x[train], y[train]).decision_function(x[test])
            pred = (oof > 0).astype(np.int8)
            self.held_out_accuracy_ = float(np.mean(pred == y))
            self.held_out_balanced_accuracy_ = float(np.mean([np.mean(pred[y == c] == c) for c in (0, 1)]))
            self.target_oof_ = oof[:n_target]  # (n_target,)
        self.folds_ = folds if folds >= 2 else 0
        self.model_ = self._model().fit(x, y)
        pos = self.target_oof_ if self.target_oof_ is not None else self.model_.decision_function(x[:n_target])
        # Zero-weight (empty) targets still count once, so every target document has a say.
        self.target_quantiles_ = weighted_quantiles(pos, np.maximum(target_weight, 1.0), QUANTILE_GRID)
        return self

    def _model(self) -> LogisticRegression:
        return LogisticRegression(C=self.C, class_weight="balanced", max_iter=self.max_iter,
                                  random_state=self.random_state)

    def decision_function(self, counts: sparse.spmatrix) -> np.ndarray:
        """Log-odds of "looks like the target": (n_docs,) float64."""
        if not hasattr(self, "model_"):
            raise ValueError("the classifier is not fitted: call fit(target_counts, pool_counts) first")
        counts = sparse.csr_matrix(counts)
        out = np.empty(counts.shape[0], dtype=np.float64)
        for start in range(0, counts.shape[0], _SCORE_ROWS):  # batches bound the float64 feature copy
            rows = slice(start, start + _SCORE_ROWS)
            out[rows] = self.model_.decision_function(hashed_features(counts[rows]))
        return out


def target_quantile(params: dict, q: float) -> float:
    """The classifier's token-weighted q-quantile of out-of-fold target scores, from its score_info params."""
    grid = params.get("target_quantiles")
    if not grid:
        raise ValueError("score_info has no target_quantiles for the classifier (scored by an older version?)")
    return float(np.interp(q, QUANTILE_GRID, np.asarray(grid, dtype=np.float64)))


@register
class ClassifierScorer(Scorer):
    """Log-odds that a pool document resembles the target set."""

    name = "classifier"
    VERSION = VERSION
    needs = frozenset({"ngrams", "target_ngrams"})

    def __init__(self, random_state: int = 0, negatives: int = 5000, negatives_by: str = "tokens"):
        super().__init__(random_state=random_state)
        self.negatives = negatives
        self.negatives_by = negatives_by

    @classmethod
    def from_settings(cls, settings, random_state: int) -> "ClassifierScorer":
        return cls(random_state=random_state, negatives=settings.classifier_negative_docs,
                   negatives_by=settings.classifier_negatives_by)

    def fit(self, data: FitInput) -> "ClassifierScorer":
        target = data.require("target_ngrams", self.name)
        model = HashedNgramClassifier(
            negatives=self.negatives, negatives_by=self.negatives_by, random_state=self.random_state
        ).fit_rows(target, data.n_pool, data.require("pool_rows", self.name),
                   data.pool_tokens if self.negatives_by == "tokens" else None)
        self.model_ = model
        self.params_ = {
            "negatives": model.n_negative_,
            "negatives_by": self.negatives_by,
            "C": model.C,
            "positives": model.n_positive_,
            "folds": model.folds_,
            "held_out_accuracy": model.held_out_accuracy_,
            "held_out_balanced_accuracy": model.held_out_balanced_accuracy_,
            "target_quantiles": [round(float(v), 6) for v in model.target_quantiles_],
            "random_state": self.random_state,
        }
        return self

    def apply(self, data: ScoreInput) -> Scores:
        return Scores(score=self.model_.decision_function(data.require("ngrams", self.name)), params=self.params_)
