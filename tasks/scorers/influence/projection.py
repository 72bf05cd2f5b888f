"""Seeded sparse Johnson-Lindenstrauss projection of per-document gradients (CountSketch).

Each input coordinate i goes to one output h(i) in 0..k-1 with a random sign s(i) (Charikar et
al. 2002; the s=1 sparse JL transform of Kane & Nelson 2014). It costs O(D) per vector, needs
no D x k matrix, and preserves inner products without bias:
    E<Pu, Pv> = <u, v>,  Var<Pu, Pv> = (|u|^2|v|^2 + <u,v>^2 - 2 sum_i u_i^2 v_i^2) / k <= 2 |u|^2 |v|^2 / k,
so by Chebyshev  P(|<Pu, Pv> - <u, v>| >= eps |u||v|) <= 2 / (k eps^2)  for any fixed u, v.
"""

from __future__ import annotations

from .errors import require_torch

require_torch()  # a clear InfluenceUnavailable, not a bare ModuleNotFoundError

from typing import Mapping, Sequence

import numpy as np
import torch


def jl_failure_bound(k: int, eps: float) -> float:
    """Upper bound on P(|<Pu,Pv> - <u,v>| >= eps |u||v|) for the CountSketch below."""
    return min(1.0, 2.0 / (k * eps * eps))


class CountSketch:
    """Projects vectors made of named segments (one per layer) to `out_dim` dimensions."""

    def __init__(self, segments: Mapping[str, int] | Sequence[tuple[str, int]], out_dim: int, seed: int = 0):
        if out_dim < 1:
            raise ValueError(f"proj_dim = {out_dim!r}; must be >= 1")
        self.out_dim = int(out_dim)
        self.seed = seed
        items = list(segments.items()) if isinstance(segments, Mapping) else list(segments)
        rng = np.random.default_rng(seed)
        self.in_dim = sum(d for _, d in items)
        self._buckets: dict[str, torch.Tensor] = {}
        self._signs: dict[str, torch.Tensor] = {}
        for name, d in items:  # drawn in segment order, so the map is fixed by (segments, out_dim, seed)
            self._buckets[name] = torch.from_numpy(rng.integers(0, out_dim, size=d, dtype=np.int64))
            self._signs[name] = torch.from_numpy(rng.integers(0, 2, size=d).astype(np.float32) * 2 - 1)

    def to(self, device: torch.device | str) -> "CountSketch":
        """Keep the hash tables on the device the gradients live on."""
        self._buckets = {n: b.to(device) for n, b in self._buckets.items()}
        self._signs = {n: s.to(device) for n, s in self._signs.items()}
        return self

    def __call__(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """parts[name]: (n, ...) with prod(...) = that segment's size -> (n, out_dim)."""
        out = None
        for name, x in parts.items():
            x = x.reshape(x.shape[0], -1)
            b = self._buckets[name].to(x.device)
            s = self._signs[name].to(x.device, x.dtype)
            if out is None:
                out = x.new_zeros((x.shape[0], self.out_dim))
            out.index_add_(1, b, x * s)
        return out
