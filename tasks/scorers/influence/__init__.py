"""Influence scorer (Quad, ICLR 2025): a proxy LM's gradient on a document against the reference
set's gradient, preconditioned by a Kronecker-factored Gauss-Newton matrix (K-FAC / EK-FAC), or
the cheaper projected-gradient cosine (LESS / TracIn).

torch is optional: this package imports without it, and using any of its torch-backed names
raises InfluenceUnavailable (an ImportError) with the install hint.

    from tasks.scorers.influence import InfluenceScorer, train_proxy, ProxyConfig
    proxy = train_proxy(pool_texts, ProxyConfig(), seed=0)
    scorer = InfluenceScorer(proxy, method="ekfac").fit(reference_texts, fit_texts=pool_sample)
    scores = scorer.score(candidate_texts)  # float64, higher = lowers the reference loss more
"""

from __future__ import annotations

import importlib

from .errors import TORCH_HINT, InfluenceUnavailable, require_torch

# public name -> submodule that defines it (imported on first use, so torch stays optional)
_LAZY = {
    "InfluenceScorer": "scorer",
    "VERSION": "scorer",
    "METHODS": "scorer",
    "ProxyConfig": "proxy",
    "ProxyLM": "proxy",
    "HFCausalLM": "proxy",
    "train_proxy": "proxy",
    "save_proxy": "proxy",
    "load_proxy": "proxy",
    "LayerFactors": "curvature",
    "fit_factors": "curvature",
    "factors_from_activations": "curvature",
    "ihvp": "curvature",
    "whiten": "curvature",
    "save_factors": "curvature",
    "load_factors": "curvature",
    "document_gradients": "curvature",
    "resolve_layers": "curvature",
    "CountSketch": "projection",
    "jl_failure_bound": "projection",
}

__all__ = ["InfluenceUnavailable", "TORCH_HINT", "require_torch", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_torch()
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
