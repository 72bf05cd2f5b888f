"""Classifier quality: a linear model of "looks like the target" on hashed n-grams (DCLM-style).

Li et al. 2024, "DataComp-LM" (arXiv:2406.11794), score documents with a fastText classifier
trained on reference (positive) vs. random pool (negative) text. Here: the same idea with the
hashed word 1+2-gram counts the featurize stage already stores, features log1p(count) with
each row L2-normalized, and a seeded, class-balanced logistic regression.

Positives: every target document. Negatives: a seeded random sample of pool documents,
`negatives_per_target` per target document, capped by the pool size. A seeded, stratified
80/20 split gives the held-out accuracy recorded in score_info; the model fitted on the 80% is
the one that scores (so the accuracy describes the model in use). Score = decision_function,
the log-odds that a document is target-like. The sampled negatives are also scored; their
scores are slightly pessimistic (the model saw them), which matters little when the pool is
much larger than the sample.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import normalize

from quadflow.tasks.scorers import FitInput, ScoreInput, Scorer, Scores, register

VERSION = "classifier-1"
_SCORE_ROWS = 65_536  # documents featurized per decision_function call


def hashed_features(counts: sparse.spmatrix) -> sparse.csr_matrix:
    """log1p(counts), rows L2-normalized: (n_docs, n_buckets) float64, dampens repeated n-grams."""
    x = sparse.csr_matrix(counts, dtype=np.float64, copy=True)
    np.log1p(x.data, out=x.data)
    return normalize(x, norm="l2", copy=False)


class HashedNgramClassifier:
    """Target (1) vs. random pool (0) logistic regression on hashed n-gram features."""

    def __init__(self, negatives_per_target: int = 5, C: float = 1.0, test_size: float = 0.2,
                 max_iter: int = 1000, random_state: int = 0):
        self.negatives_per_target = negatives_per_target
        self.C = C
        self.test_size = test_size
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, target_counts: sparse.spmatrix, pool_counts: sparse.spmatrix) -> "HashedNgramClassifier":
        """Sample negatives from the pool, hold out test_size, fit on the rest."""
        if target_counts.shape[1] != pool_counts.shape[1]:
            raise ValueError(f"target has {target_counts.shape[1]} buckets, pool has {pool_counts.shape[1]}")
        pool_counts = sparse.csr_matrix(pool_counts)
        return self.fit_rows(target_counts, pool_counts.shape[0], lambda idx: pool_counts[idx])

    def fit_rows(self, target_counts: sparse.spmatrix, n_pool: int, pool_rows) -> "HashedNgramClassifier":
        """fit() for a pool read row by row: `pool_rows(idx)` gives the (len(idx), B) counts of sorted doc_idx."""
        n_target = target_counts.shape[0]
        if self.negatives_per_target < 1:
            raise ValueError(f"negatives_per_target must be >= 1, got {self.negatives_per_target!r}")
        if n_target == 0 or n_pool == 0:
            raise ValueError(f"the classifier needs target and pool documents, got {n_target} and {n_pool}")
        rng = np.random.default_rng(self.random_state)
        n_neg = min(n_target * self.negatives_per_target, n_pool)
        self.negative_idx_ = np.sort(rng.choice(n_pool, size=n_neg, replace=False))  # (n_neg,) pool doc_idx
        negatives = sparse.csr_matrix(pool_rows(self.negative_idx_))
        if negatives.shape[1] != target_counts.shape[1]:
            raise ValueError(f"target has {target_counts.shape[1]} buckets, pool has {negatives.shape[1]}")
        x = sparse.vstack([hashed_features(target_counts), hashed_features(negatives)],
                          format="csr")  # (n_target + n_neg, B)
        y = np.r_[np.ones(n_target, dtype=np.int8), np.zeros(n_neg, dtype=np.int8)]

        n_test = int(round(self.test_size * y.size))
        # A held-out split needs >= 2 documents of each class and room for both classes in the test set.
        if min(n_target, n_neg) >= 2 and 2 <= n_test <= y.size - 2:
            x_tr, x_te, y_tr, y_te = train_test_split(
                x, y, test_size=n_test, stratify=y, random_state=self.random_state
            )
        else:
            x_tr, y_tr, x_te, y_te = x, y, None, None
        self.model_ = LogisticRegression(
            C=self.C, class_weight="balanced", max_iter=self.max_iter, random_state=self.random_state
        ).fit(x_tr, y_tr)
        self.n_positive_, self.n_negative_ = int(n_target), int(n_neg)
        self.train_size_ = int(y_tr.size)
        self.test_size_ = 0 if y_te is None else int(y_te.size)
        if y_te is None:
            self.held_out_accuracy_ = None
            self.held_out_balanced_accuracy_ = None
        else:
            pred = self.model_.predict(x_te)
            self.held_out_accuracy_ = float(np.mean(pred == y_te))
            recalls = [np.mean(pred[y_te == c] == c) for c in (0, 1)]
            self.held_out_balanced_accuracy_ = float(np.mean(recalls))
        return self

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


@register
class ClassifierScorer(Scorer):
    """Log-odds that a pool document resembles the target set."""

    name = "classifier"
    VERSION = VERSION
    needs = frozenset({"ngrams", "target_ngrams"})

    def __init__(self, random_state: int = 0, negatives_per_target: int = 5):
        super().__init__(random_state=random_state)
        self.negatives_per_target = negatives_per_target

    @classmethod
    def from_settings(cls, settings, random_state: int) -> "ClassifierScorer":
        return cls(random_state=random_state, negatives_per_target=settings.classifier_negatives)

    def fit(self, data: FitInput) -> "ClassifierScorer":
        target = data.require("target_ngrams", self.name)
        model = HashedNgramClassifier(
            negatives_per_target=self.negatives_per_target, random_state=self.random_state
        ).fit_rows(target, data.n_pool, data.require("pool_rows", self.name))
        self.model_ = model
        self.params_ = {
            "negatives_per_target": self.negatives_per_target,
            "C": model.C,
            "positives": model.n_positive_,
            "negatives": model.n_negative_,
            "train_size": model.train_size_,
            "test_size": model.test_size_,
            "held_out_accuracy": model.held_out_accuracy_,
            "held_out_balanced_accuracy": model.held_out_balanced_accuracy_,
            "random_state": self.random_state,
        }
        return self

    def apply(self, data: ScoreInput) -> Scores:
        return Scores(score=self.model_.decision_function(data.require("ngrams", self.name)), params=self.params_)
