"""The influence scorer in the pipeline: fitted once by the score stage, kept in one file, loaded
by the select stage to score the documents the bandit probes (and nothing else).

The file (torch.save of plain tensors and Python values, loadable with weights_only=True) holds
everything `InfluenceScorer.score` reads: the scorer's parameters, the proxy (its weights when it
was trained here, its checkpoint path otherwise), the curvature factors and the preconditioned
reference query. Loading it gives scores identical to the scorer that was saved.
"""

from __future__ import annotations

from .errors import require_torch

require_torch()  # a clear InfluenceUnavailable, not a bare ModuleNotFoundError

import hashlib
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from quadflow.log import get_logger

from . import VERSION
from .curvature import LayerFactors
from .projection import CountSketch
from .proxy import ProxyConfig, ProxyLM, default_device, load_proxy, n_params, train_proxy
from .scorer import InfluenceScorer

STATE_FORMAT = "quadflow-influence-state-1"
TRAIN_DOC_TOKENS = ProxyConfig.max_doc_tokens  # tokens train_proxy keeps per sampled document


def device_of(settings: Any) -> str | None:
    """InfluenceSettings.device as torch takes it: None (cuda when available, else cpu) for 'auto'."""
    return None if settings.device == "auto" else settings.device


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's CPU thread count set to n (None: unchanged) for the block, then restored (it is process-wide)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def proxy_config(settings: Any) -> ProxyConfig:
    """The trained proxy's architecture and budget from InfluenceSettings (everything else: ProxyConfig's defaults)."""
    return ProxyConfig(n_layers=settings.n_layers, d_model=settings.d_model, n_heads=settings.n_heads,
                       seq_len=settings.seq_len, steps=settings.steps, train_docs=settings.train_docs)


def text_limits(settings: Any) -> tuple[int, int]:
    """(characters of a document the scorer can read, characters training can read), for the byte-level
    proxy: one byte per token at least, so longer prefixes are never needed (a user checkpoint: 16 per token)."""
    per_token = 1 if settings.proxy_path is None else 16
    return per_token * settings.max_chunks * settings.seq_len, per_token * TRAIN_DOC_TOKENS


def build_proxy(settings: Any, train_texts: Sequence[str], random_state: int) -> nn.Module:
    """The proxy LM: loaded from settings.proxy_path (never downloaded), or trained on train_texts (seeded)."""
    if settings.proxy_path is not None:
        return load_proxy(settings.proxy_path, device=device_of(settings), seq_len=settings.seq_len)
    return train_proxy(train_texts, proxy_config(settings), seed=random_state, device=device_of(settings))


def make_scorer(settings: Any, model: nn.Module, random_state: int) -> InfluenceScorer:
    """An unfitted InfluenceScorer configured by InfluenceSettings."""
    return InfluenceScorer(model, layers=settings.layers, method=settings.method, proj_dim=settings.proj_dim,
                           damping=settings.damping, max_chunks=settings.max_chunks,
                           batch_tokens=settings.batch_tokens, device=device_of(settings),
                           random_state=random_state)


def fit_influence(settings: Any, reference_texts: Sequence[str], fit_texts: Sequence[str],
                  train_texts: Sequence[str], random_state: int) -> tuple[InfluenceScorer, dict[str, Any]]:
    """Train (or load) the proxy and fit the scorer; returns it and the statistics score_info records."""
    start = time.monotonic()
    with torch_threads(settings.threads):
        model = build_proxy(settings, train_texts, random_state)
        proxy_seconds = time.monotonic() - start
        scorer = make_scorer(settings, model, random_state).fit(reference_texts, fit_texts=fit_texts)
    stats = {
        "proxy": "trained" if settings.proxy_path is None else "checkpoint",
        "proxy_params": n_params(model),
        "proxy_seq_len": int(model.seq_len),
        "proxy_train_loss": getattr(model, "train_loss_", None),
        "proxy_seconds": round(proxy_seconds, 3),
        "fit_seconds": round(scorer.fit_seconds_, 3),
        "reference_docs": len(reference_texts),
        "fit_docs": len(fit_texts),
        "train_docs": 0 if settings.proxy_path is not None else min(len(train_texts), settings.train_docs),
        "layers_read": list(scorer.layers_),
        "device": str(scorer.device_),
        "threads": torch.get_num_threads() if settings.threads is None else settings.threads,
    }
    return scorer, stats


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    return x


def save_fitted(scorer: InfluenceScorer, path: str | Path, meta: dict[str, Any] | None = None,
                proxy_path: str | None = None) -> str:
    """Write a fitted scorer to `path` (written aside, then moved into place); returns the file's sha256.

    A proxy trained here is stored in the file; a checkpoint given by path (proxy_path) is stored by path.
    """
    scorer._check_fitted()
    model = scorer.model
    if proxy_path is None:
        if not isinstance(model, ProxyLM):
            raise TypeError(f"a {type(model).__name__} proxy is saved by its checkpoint path: give proxy_path")
        proxy = {"kind": "trained", "config": asdict(model.config), "weights": _cpu(model.state_dict())}
    else:
        proxy = {"kind": "checkpoint", "path": str(proxy_path), "seq_len": int(model.seq_len)}
    params = scorer.get_params()
    params["layers"] = params["layers"] if isinstance(params["layers"], str) else list(params["layers"])
    state = {
        "format": STATE_FORMAT,
        "version": VERSION,
        "params": params,
        "proxy": proxy,
        "layers": list(scorer.layers_),
        "shapes": {n: list(s) for n, s in scorer.shapes_.items()},
        "factors": None if scorer.factors_ is None else {n: dict(vars(f)) for n, f in scorer.factors_.items()},
        "reference_gradient": _cpu(scorer.reference_gradient_),
        "query": _cpu(scorer.query_),
        "query_norm": float(scorer.query_norm_),
        "projection_seed": None if scorer.projection_ is None else int(scorer.projection_.seed),
        "fit_seconds": float(scorer.fit_seconds_),
        "meta": dict(meta or {}),
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha256_file(p)


def load_fitted(path: str | Path, device: str | None = None) -> tuple[InfluenceScorer, dict[str, Any]]:
    """The fitted scorer saved by save_fitted, on `device` (None: cuda when available), and its meta."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"fitted influence state {str(p)!r} does not exist")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{str(p)!r} has format {state.get('format')!r}; expected {STATE_FORMAT!r}")
    if state.get("version") != VERSION:
        raise ValueError(f"{str(p)!r} was fitted by {state.get('version')!r}; this code is {VERSION!r}: refit it")
    dev = torch.device(device) if device is not None else default_device()
    proxy = state["proxy"]
    if proxy["kind"] == "trained":
        model = ProxyLM(ProxyConfig(**proxy["config"]))
        model.load_state_dict(proxy["weights"])
    else:
        model = load_proxy(proxy["path"], device=dev, seq_len=proxy["seq_len"])
    params = {k: v for k, v in state["params"].items() if k != "version"}
    scorer = InfluenceScorer(model, device=str(dev), **params)
    scorer._check_params()
    scorer.device_ = dev
    model.to(dev).eval()
    scorer.layers_ = list(state["layers"])
    scorer.shapes_ = {n: tuple(s) for n, s in state["shapes"].items()}
    scorer.factors_ = None if state["factors"] is None else {
        n: LayerFactors(**d) for n, d in state["factors"].items()}
    scorer.reference_gradient_ = state["reference_gradient"]
    query = state["query"]
    scorer.query_ = {n: q.to(dev) for n, q in query.items()} if isinstance(query, dict) else query.to(dev)
    scorer.query_norm_ = float(state["query_norm"])
    scorer.projection_ = None
    if state["projection_seed"] is not None:
        scorer.projection_ = CountSketch(
            [(n, int(np.prod(s))) for n, s in scorer.shapes_.items()], scorer.proj_dim, seed=state["projection_seed"]
        ).to(dev)
    scorer.fit_seconds_ = float(state["fit_seconds"])
    get_logger().debug(f"influence: loaded {scorer.method} state from {p} onto {dev}")
    return scorer, dict(state["meta"])
