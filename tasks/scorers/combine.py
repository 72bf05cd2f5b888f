"""The combined score: one number per document from several scorers on different scales.

combined(d) = sum_s w_s * rank_s(d) / sum_s w_s, over the chosen scorers s, where rank_s(d) is
the percentile rank of document d's score among the pool's scores for scorer s:
(average rank - 1) / (n - 1), with tied scores sharing their average rank, so the lowest score
maps to 0, the highest to 1, and a scorer that gives every document the same score puts all
of them at 0.5 (a single document is also at 0.5). Weights w_s come from
`score.weights` (default 1 for each chosen scorer; weights of scorers not chosen are ignored).

Ranks make the scorers commensurable (a heuristic pass fraction, a DSIR log ratio and a
classifier log-odds) and make the combination insensitive to any one scorer's outliers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.stats import rankdata

from quadflow.settings import ConfigError

VERSION = "combined-1"


def percentile_ranks(scores: np.ndarray) -> np.ndarray:
    """Average-tie ranks scaled to [0, 1]: (n,) float64, 0 = lowest score, 1 = highest."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError(f"scores hold NaN at doc {int(np.flatnonzero(np.isnan(scores))[0])}")
    n = scores.size
    if n <= 1:
        return np.full(n, 0.5)
    return (rankdata(scores, method="average") - 1.0) / (n - 1)


def resolve_weights(names: list[str], weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Weight per chosen scorer (default 1), checked: non-negative, not all zero."""
    weights = dict(weights or {})
    out = {name: float(weights.get(name, 1.0)) for name in names}
    if not out:
        raise ConfigError("the combined score needs at least one scorer, got none")
    for name, w in out.items():
        if not (w >= 0 and np.isfinite(w)):
            raise ConfigError(f"score.weights[{name!r}] = {w!r}: weights must be finite and >= 0")
    if sum(out.values()) <= 0:
        raise ConfigError(f"score.weights = {out} give every chosen scorer weight 0; at least one must be > 0")
    return out


def combine(scores: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None) -> np.ndarray:
    """Weighted mean of each scorer's percentile rank in the pool: (n_docs,) float64 in [0, 1]."""
    return combine_ranks({name: percentile_ranks(s) for name, s in scores.items()}, weights)


def combine_ranks(ranks: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None) -> np.ndarray:
    """Weighted mean of precomputed percentile ranks (any slice of the pool): (n_docs,) float64 in [0, 1]."""
    w = resolve_weights(list(ranks), weights)
    sizes = {name: np.asarray(r).shape for name, r in ranks.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"scorers scored different numbers of documents: {sizes}")
    total = sum(w.values())
    out = np.zeros(next(iter(sizes.values())), dtype=np.float64)
    for name, r in ranks.items():
        if w[name] > 0:
            out += (w[name] / total) * np.asarray(r, dtype=np.float64)
    return np.clip(out, 0.0, 1.0)  # float rounding must not leave [0, 1]


def combined_version(versions: Mapping[str, str]) -> str:
    """Version of the combined score: its own and every component's, so any change shows."""
    return "+".join([VERSION, *(versions[name] for name in versions)])
