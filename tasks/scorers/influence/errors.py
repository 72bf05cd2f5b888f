"""The one error of the influence scorer that needs no torch to raise."""

from __future__ import annotations

TORCH_HINT = "the influence scorer needs torch: pip install -e '.[influence]'"


class InfluenceUnavailable(ImportError):
    """An optional dependency of the influence scorer (torch, or transformers for HF checkpoints) is missing."""


def require_torch():
    """Import torch or raise InfluenceUnavailable with the install hint."""
    try:
        import torch
    except ImportError as e:
        raise InfluenceUnavailable(TORCH_HINT) from e
    return torch
