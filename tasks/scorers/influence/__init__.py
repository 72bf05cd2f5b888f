"""Influence scorer (Quad, ICLR 2025): a proxy LM's gradient on a document against the reference
set's gradient, preconditioned by a Kronecker-factored Gauss-Newton matrix (K-FAC / EK-FAC), or
the cheaper projected-gradient cosine (LESS / TracIn).

torch is optional: this package imports without it, and using any of its torch-backed names
raises InfluenceUnavailable (an ImportError) with the install hint.

    from quadflow.tasks.scorers.influence import InfluenceScorer, train_proxy, ProxyConfig
    proxy = train_proxy(pool_texts, ProxyConfig(), seed=0)
    scorer = InfluenceScorer(proxy, method="ekfac").fit(reference_texts, fit_texts=pool_sample)
    scores = scorer.score(candidate_texts)  # float64, higher = lowers the reference loss more

In the pipeline (`--scorer influence`) the score stage fits the scorer once and saves it
(fitted.py); the select stage loads it and scores only the documents the bandit probes.
"""

from __future__ import annotations

import importlib
from typing import Any

from quadflow.tasks.scorers import Scorer, ScoreInput, Scores, register

from .errors import TORCH_HINT, InfluenceUnavailable, require_torch

VERSION = "influence-1"  # bumped when scores change; here so the registry needs no torch

# public name -> submodule that defines it (imported on first use, so torch stays optional)
_LAZY = {
    "InfluenceScorer": "scorer",
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

__all__ = ["InfluenceUnavailable", "TORCH_HINT", "VERSION", "Influence", "require_torch", *_LAZY]


@register
class Influence(Scorer):
    """The registry's entry for `--scorer influence`: fitted by the score stage, run on probes only."""

    name = "influence"
    VERSION = VERSION
    pool_wide = False

    def __init__(self, settings: Any = None, random_state: int = 0):
        super().__init__(random_state=random_state)
        self.settings = settings  # quadflow.settings.InfluenceSettings

    @classmethod
    def from_settings(cls, settings: Any, random_state: int) -> "Influence":
        return cls(settings=settings.influence, random_state=random_state)

    @classmethod
    def needs_target(cls) -> bool:
        return True  # the reference set whose loss the documents' gradients are scored against

    def score(self, data: ScoreInput) -> Scores:
        raise ValueError("the influence scorer scores probed documents only (select.probe_scorer = 'influence'), "
                         "not the whole pool")


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_torch()
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
