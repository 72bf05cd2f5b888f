"""Selection metrics: how close a selection is to the target, and how much of the pool it covers.

KL reduction on hashed n-gram counts is DSIR's metric (Xie et al., 2023, "Data Selection for
Language Models via Importance Resampling", section 5): KL(target || raw) - KL(target || selected),
positive when the selection is closer to the target than the raw pool is.
All logs are natural, so divergences and entropies are in nats.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

OTHER = "(other)"


def _counts(name: str, counts) -> np.ndarray:
    a = np.asarray(counts, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-d count vector, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        bad = a[~np.isfinite(a) | (a < 0)][0]
        raise ValueError(f"{name} holds {float(bad)!r}; counts must be finite and >= 0")
    return a


def kl_divergence(p_counts, q_counts, smoothing: float = 1.0) -> float:
    """KL(p || q) in nats between two hashed-bucket count vectors, add-`smoothing` on every bucket.

    Smoothing keeps the divergence finite where q has an empty bucket that p uses.
    """
    p = _counts("p_counts", p_counts)
    q = _counts("q_counts", q_counts)
    if p.shape != q.shape:
        raise ValueError(f"p_counts has {p.size} buckets but q_counts has {q.size}; they must match")
    if smoothing < 0:
        raise ValueError(f"smoothing = {smoothing!r}; it must be >= 0")
    p = p + smoothing
    q = q + smoothing
    if p.sum() == 0 or q.sum() == 0:
        raise ValueError("a count vector sums to 0 with smoothing = 0; KL is undefined")
    p /= p.sum()  # (buckets,) probabilities
    q /= q.sum()
    mask = p > 0  # 0 * log 0 = 0
    if np.any(q[mask] == 0):
        return float("inf")
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def kl_reduction(target, raw, selected, smoothing: float = 1.0) -> float:
    """KL(target || raw) - KL(target || selected): positive = the selection moved toward the target."""
    return kl_divergence(target, raw, smoothing) - kl_divergence(target, selected, smoothing)


def cluster_coverage(selected_clusters, k: int) -> float:
    """Fraction of the k clusters that hold at least one selected document (a diversity check)."""
    if k < 1:
        raise ValueError(f"k = {k!r}; there must be at least one cluster")
    c = np.asarray(selected_clusters, dtype=np.int64).ravel()
    if c.size and (c.min() < 0 or c.max() >= k):
        bad = c[(c < 0) | (c >= k)][0]
        raise ValueError(f"cluster id {int(bad)} is outside 0..{k - 1}")
    return float(np.unique(c).size / k)


def entropy(counts) -> float:
    """Shannon entropy in nats of the distribution the counts describe (0 for an empty vector)."""
    a = _counts("counts", counts)
    total = a.sum()
    if total == 0:
        return 0.0
    p = a[a > 0] / total
    return float(-np.sum(p * np.log(p)))


def source_mix(sources: Sequence[str], tokens, top: int = 10) -> dict[str, float]:
    """Token share per source, largest first; sources past `top` are pooled under "(other)".

    `sources` may repeat (one entry per document or per group); tokens are summed per source.
    Ties in share are broken by name so the result is deterministic.
    """
    if top < 1:
        raise ValueError(f"top = {top!r}; it must be >= 1")
    t = _counts("tokens", tokens) if len(sources) else np.zeros(0)
    if len(sources) != t.size:
        raise ValueError(f"{len(sources)} sources but {t.size} token counts; they must match")
    totals: dict[str, float] = {}
    for name, n in zip(sources, t.tolist()):
        key = "(none)" if name is None else str(name)
        totals[key] = totals.get(key, 0.0) + n
    grand = sum(totals.values())
    if grand == 0:
        return {}
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))
    out = {name: n / grand for name, n in ranked[:top]}
    rest = sum(n for _, n in ranked[top:])
    if rest > 0:
        out[OTHER] = out.get(OTHER, 0.0) + rest / grand
    return out
