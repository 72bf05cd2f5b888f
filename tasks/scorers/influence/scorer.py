"""InfluenceScorer: Quad's quality signal from a proxy LM's gradients.

Score of a document z against a reference set D_r (higher is better):
    ekfac / kfac:  score(z) = grad L(D_r)^T (G + lambda I)^-1 grad L(z)
    cosine:        score(z) = cos(grad L(D_r), grad L(z))           (LESS / TracIn, no Hessian)
where L is the mean next-token loss of a document, grad L(D_r) the mean of the reference
documents' gradients, and G the Gauss-Newton matrix of the chosen layers (K-FAC / EK-FAC).
This is minus the influence I(D_r, z) of Koh & Liang and Quad: a preconditioned step on z,
theta' = theta - eta (G + lambda I)^-1 grad L(z), changes the reference loss by -eta * score(z),
so a positive score means training on z lowers the reference loss.
"""

from __future__ import annotations

from .errors import require_torch

require_torch()  # a clear InfluenceUnavailable, not a bare ModuleNotFoundError

import time
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from quadflow.log import Progress, get_logger

from .curvature import (
    LayerFactors,
    document_gradients,
    fit_factors,
    ihvp,
    layer_shape,
    resolve_layers,
    tokenize_documents,
    whiten,
)
from . import VERSION
from .projection import CountSketch
from .proxy import default_device

METHODS = ("ekfac", "kfac", "cosine")
BLOCK_DOCS = 4096  # texts tokenized at once; batches are length-sorted within a block


class InfluenceScorer:
    """Scores documents by how much a (preconditioned) gradient step on them lowers the reference loss."""

    def __init__(
        self,
        model: nn.Module,  # a proxy: train_proxy / load_proxy (ids -> logits, .tokenizer, .seq_len)
        layers: str | Sequence[str] = "attention",  # 'attention' (q, k, v, o: Quad), 'attention+mlp', or names
        method: str = "ekfac",  # 'ekfac', 'kfac' or 'cosine'
        proj_dim: int | None = None,  # None: exact inner products; k: score through a k-dim CountSketch
        damping: float = 0.1,  # x mean eigenvalue per layer (Grosse et al. 2023; kronfluence's default)
        fisher: str = "sampled",  # labels drawn from the model (true Fisher = GGN) or 'empirical'
        max_chunks: int = 2,  # a document counts by its first max_chunks * seq_len tokens
        batch_tokens: int = 8192,  # padded tokens per forward/backward batch (raise it on a GPU)
        device: str | None = None,  # default: cuda if available, else cpu
        random_state: int = 0,  # seeds the sampled labels and the projection
    ):
        self.model = model
        self.layers = layers
        self.method = method
        self.proj_dim = proj_dim
        self.damping = damping
        self.fisher = fisher
        self.max_chunks = max_chunks
        self.batch_tokens = batch_tokens
        self.device = device
        self.random_state = random_state

    def get_params(self) -> dict:
        """The scorer's settings (model excluded), for score_info rows and manifests."""
        layers = self.layers if isinstance(self.layers, str) else list(self.layers)
        return {
            "version": VERSION,
            "layers": layers,
            "method": self.method,
            "proj_dim": self.proj_dim,
            "damping": self.damping,
            "fisher": self.fisher,
            "max_chunks": self.max_chunks,
            "batch_tokens": self.batch_tokens,
            "random_state": self.random_state,
        }

    def _check_params(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method = {self.method!r}; use one of {', '.join(METHODS)}")
        if self.proj_dim is not None and self.proj_dim < 1:
            raise ValueError(f"proj_dim = {self.proj_dim!r}; must be >= 1 or None (exact inner products)")
        if self.damping < 0:
            raise ValueError(f"damping = {self.damping!r}; must be >= 0")
        if self.max_chunks < 1:
            raise ValueError(f"max_chunks = {self.max_chunks!r}; must be >= 1")
        if self.batch_tokens < 1:
            raise ValueError(f"batch_tokens = {self.batch_tokens!r}; must be >= 1")

    def fit(self, reference_texts: Sequence[str], fit_texts: Sequence[str] | None = None) -> "InfluenceScorer":
        """Fit the curvature factors on fit_texts (default: the reference texts) and precondition
        the mean reference gradient once. Moves the model to `device` (default: cuda if available)."""
        self._check_params()
        if len(reference_texts) == 0:
            raise ValueError("fit got no reference texts")
        start = time.monotonic()
        self.device_ = torch.device(self.device) if self.device is not None else default_device()
        self.model.to(self.device_).eval()
        self.layers_ = resolve_layers(self.model, self.layers)
        self.shapes_ = {n: layer_shape(self.model.get_submodule(n)) for n in self.layers_}
        label_seed, proj_seed = (int(s) for s in np.random.SeedSequence(self.random_state).generate_state(2))

        self.factors_: dict[str, LayerFactors] | None = None
        if self.method != "cosine":
            fit_on = reference_texts if fit_texts is None or len(fit_texts) == 0 else fit_texts
            self.factors_ = fit_factors(
                self.model, fit_on, self.layers_, ekfac=self.method == "ekfac", fisher=self.fisher,
                max_chunks=self.max_chunks, batch_tokens=self.batch_tokens, seed=label_seed,
            )

        ref = {n: torch.zeros(s, dtype=torch.float64, device=self.device_) for n, s in self.shapes_.items()}
        for _, grads in self._gradients(reference_texts):
            for n, g in grads.items():
                ref[n] += g.double().sum(0)
        self.reference_gradient_ = {n: (g / len(reference_texts)).cpu() for n, g in ref.items()}  # (d_out, d_in)

        dtype = next(self.model.parameters()).dtype
        ref_dev = {n: g.to(self.device_)[None] for n, g in self.reference_gradient_.items()}  # (1, d_out, d_in)
        self.projection_ = None
        if self.proj_dim is None:
            # exact: one inner product per layer with the preconditioned reference gradient
            query = ref_dev
            if self.factors_ is not None:
                query = ihvp(self.factors_, ref_dev, self.damping, method=self.method, relative=True)
            self.query_ = {n: q[0].double() for n, q in query.items()}  # float64: the query can span decades
            self.query_norm_ = float(self._norms(query)[0])
        else:
            # projected: whitened gradients through a seeded CountSketch, <Pw(g_ref), Pw(g_z)> ~= score
            self.projection_ = CountSketch(
                [(n, int(np.prod(s))) for n, s in self.shapes_.items()], self.proj_dim, seed=proj_seed
            ).to(self.device_)
            self.query_ = self._features({n: g.to(dtype) for n, g in ref_dev.items()})[0]  # (proj_dim,)
            self.query_norm_ = float(self.query_.double().norm())
        self.fit_seconds_ = time.monotonic() - start
        get_logger().info(
            f"influence: fitted {self.method} on {len(self.layers_)} layers "
            f"({sum(int(np.prod(s)) for s in self.shapes_.values()):,} parameters) in {self.fit_seconds_:.1f}s"
        )
        return self

    @staticmethod
    def _norms(parts: dict[str, torch.Tensor]) -> torch.Tensor:
        sq = sum(p.reshape(p.shape[0], -1).double().pow(2).sum(1) for p in parts.values())
        return sq.sqrt()

    def _features(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """(n, proj_dim) sketch of whitened gradients (raw gradients for cosine)."""
        if self.factors_ is not None:
            grads = whiten(self.factors_, grads, self.damping, method=self.method, relative=True)
        return self.projection_(grads)

    def _batch_scores(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.projection_ is not None:
            z = self._features(grads).double()  # (n, proj_dim)
            dots = z @ self.query_.double()
            norms = z.norm(dim=1)
        else:
            dots = sum((grads[n].double() * self.query_[n]).sum((1, 2)) for n in self.layers_)
            norms = self._norms(grads)
        if self.method == "cosine":
            denom = norms * self.query_norm_
            return torch.where(denom > 0, dots / denom.clamp(min=1e-300), torch.zeros_like(dots))
        return dots

    def _gradients(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """Per-document gradients in blocks of BLOCK_DOCS texts (bounded memory): (indices into texts, grads)."""
        for lo in range(0, len(texts), BLOCK_DOCS):
            docs = tokenize_documents(self.model, texts[lo : lo + BLOCK_DOCS], self.max_chunks)
            for idx, grads in document_gradients(self.model, self.layers_, docs, self.batch_tokens):
                yield idx + lo, grads

    def _check_fitted(self) -> None:
        if not hasattr(self, "query_"):
            raise RuntimeError("InfluenceScorer is not fitted; call fit(reference_texts, fit_texts) first")

    def score(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
        """One float64 score per text, in input order; higher = lowers the reference loss more.
        progress=False: no progress log (callers scoring a few probes per bandit round)."""
        self._check_fitted()
        out = np.zeros(len(texts), dtype=np.float64)
        if len(texts) == 0:
            return out
        bar = Progress("influence score", total=len(texts)) if progress else None
        start = time.monotonic()
        for idx, grads in self._gradients(texts):
            out[idx] = self._batch_scores(grads).cpu().numpy()
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        self.docs_per_s_ = len(texts) / max(time.monotonic() - start, 1e-9)
        return out

    def features(self, texts: Sequence[str]) -> np.ndarray:
        """Per-document gradient features, float32, input order, whose inner products approximate
        influence: <x_i, x_j> ~= g_i^T (G + lambda I)^-1 g_j (ekfac/kfac; whitened gradients) or
        g_i^T g_j (cosine); (n, proj_dim) through the seeded projection, (n, n_params) without one."""
        self._check_fitted()
        dim = self.proj_dim or sum(int(np.prod(s)) for s in self.shapes_.values())
        out = np.zeros((len(texts), dim), dtype=np.float32)
        if len(texts) == 0:
            return out
        for idx, grads in self._gradients(texts):
            if self.projection_ is not None:
                z = self._features(grads)
            else:
                if self.factors_ is not None:
                    grads = whiten(self.factors_, grads, self.damping, method=self.method, relative=True)
                z = torch.cat([grads[n].reshape(len(idx), -1) for n in self.layers_], dim=1)
            out[idx] = z.float().cpu().numpy()
        return out
