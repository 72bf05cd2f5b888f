"""Per-document gradients of chosen linear layers, K-FAC / EK-FAC factors and the damped iHVP.

For a linear layer s = W a (W: (d_out, d_in)), the gradient of a sequence's loss is
G = sum_t g_t a_t^T with g_t = dL/ds_t, so per-example gradients are one batched matrix product
of the recorded layer inputs and output gradients: no per-example backward passes.

The Gauss-Newton matrix of a layer, F = E_n[vec(G_n) vec(G_n)^T] (labels sampled from the model:
the "true Fisher", which equals the GGN for softmax cross-entropy), is approximated by
- K-FAC (Martens & Grosse 2015): F ~= A (x) S, A = E_tokens[a a^T], S = sum_t g g^T / n_examples;
- EK-FAC (George et al. 2018; Grosse et al. 2023): the same eigenbasis Q_A (x) Q_S, with the
  eigenvalues refitted as Lambda_ij = E_n[(Q_S^T G_n Q_A)_ij^2], the diagonal that minimizes the
  Frobenius error to F in that basis (so EK-FAC is never further from F than K-FAC).
vec() is column-major, so (A (x) S) vec(V) = vec(S V A).

The damped inverse (F + lambda I)^-1 v is applied in the eigenbasis: Q_S [(Q_S^T V Q_A) / (Lambda + lambda)] Q_A^T.
It divides by the (damped) eigenvalues; the released Quad code multiplied by them.
"""

from __future__ import annotations

from .errors import require_torch

require_torch()  # a clear InfluenceUnavailable, not a bare ModuleNotFoundError

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .tokens import IGNORE, Batch, document_tokens, make_batches

ATTENTION_PARTS = ("attn", "attention")
MLP_PARTS = ("mlp", "ffn", "feed_forward", "fc1", "fc2", "dense_h_to_4h", "dense_4h_to_h")
Fisher = Literal["sampled", "empirical"]
Method = Literal["ekfac", "kfac"]


# ---------------------------------------------------------------- layers


def _is_linear(m: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D is a linear layer with a transposed weight (in, out)
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))


def layer_shape(m: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a layer's gradient; d_in counts a bias as a constant-1 input."""
    bias = int(getattr(m, "bias", None) is not None)
    if isinstance(m, nn.Linear):
        return m.out_features, m.in_features + bias
    return int(m.nf), int(m.weight.shape[0]) + bias


def resolve_layers(model: nn.Module, layers: str | Sequence[str] = "attention") -> list[str]:
    """Names of the linear layers to read: 'attention', 'attention+mlp', or explicit module names."""
    linear = {n: m for n, m in model.named_modules() if _is_linear(m)}

    def has_part(name: str, parts: tuple[str, ...]) -> bool:
        return any(any(p in piece for p in parts) for piece in name.split("."))

    if isinstance(layers, str):
        if layers not in ("attention", "attention+mlp"):
            raise ValueError(f"layers = {layers!r}; use 'attention', 'attention+mlp' or a list of module names")
        parts = ATTENTION_PARTS + (MLP_PARTS if layers == "attention+mlp" else ())
        names = [n for n in linear if has_part(n, parts)]
        if not names:
            raise ValueError(
                f"no {layers} linear layers found in {type(model).__name__}; give module names, e.g. {list(linear)[:4]}"
            )
        return names
    names = list(layers)
    unknown = [n for n in names if n not in linear]
    if unknown or not names:
        raise ValueError(f"layers {unknown or names!r} are not linear layers of {type(model).__name__}")
    return names


class _Capture:
    """Records each chosen layer's input and output during one forward pass."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.modules = modules
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> "_Capture":
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module, inp, out):
            if name in self.outputs:
                raise ValueError(f"layer {name!r} ran twice in one forward pass; shared layers are not supported")
            self.inputs[name] = inp[0].detach()
            self.outputs[name] = out

        return hook


@contextlib.contextmanager
def _grad_only_through(model: nn.Module, modules: Mapping[str, nn.Module]):
    """Let autograd track the chosen layers only (their outputs need a graph), restoring flags after."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    chosen = {id(p) for m in modules.values() for p in m.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _layer_inputs(m: nn.Module, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(R, T, d_in) inputs with a constant-1 column for a bias, zeroed on padding."""
    if getattr(m, "bias", None) is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return a * mask[..., None].to(a.dtype)


def _batch_io(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batch: Batch,
    device: torch.device,
    weighted: bool,
    generator: torch.Generator | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """One forward/backward: per layer (a (R,T,d_in), g (R,T,d_out)) and the valid-token mask (R,T).

    weighted: loss = sum_t w_t nll_t (w = 1/doc tokens, the document's mean loss, for gradients);
    else loss = sum_t nll_t per chunk (the sequence loss whose Fisher K-FAC fits).
    generator: labels sampled from the model (true Fisher); None keeps the observed next tokens.
    """
    ids = torch.from_numpy(batch.inputs).to(device)
    targets = torch.from_numpy(batch.targets).to(device)
    mask = targets != IGNORE
    with _grad_only_through(model, modules), _Capture(modules) as cap:
        logits = model(ids)  # (R, T, V)
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        if generator is not None:
            probs = torch.softmax(logits.detach()[mask], dim=-1)  # (N_valid, V)
            sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            targets = targets.clone()
            targets[mask] = sampled
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
        ).view(targets.shape)  # (R, T)
        if weighted:
            loss = (nll * torch.from_numpy(batch.weights).to(device, nll.dtype)).sum()
        else:
            loss = nll.sum()
        names = list(modules)
        grads = torch.autograd.grad(loss, [cap.outputs[n] for n in names])
    a = {n: _layer_inputs(modules[n], cap.inputs[n], mask) for n in names}
    g = {n: gr.detach() for n, gr in zip(names, grads)}
    return a, g, mask


def tokenize_documents(model: nn.Module, texts: Iterable[str], max_chunks: int) -> list[np.ndarray]:
    """[BOS, ..., EOS] ids of each text, cut to max_chunks * seq_len targets."""
    if max_chunks < 1:
        raise ValueError(f"max_chunks = {max_chunks!r}; must be >= 1")
    limit = max_chunks * model.seq_len
    return [document_tokens(model.tokenizer, t, limit) for t in texts]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def document_gradients(
    model: nn.Module,
    layers: Sequence[str],
    docs: Sequence[np.ndarray],
    batch_tokens: int = 8192,
    max_batch_docs: int = 128,
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Per-document gradients of the mean next-token loss: (doc indices, {layer: (n, d_out, d_in)}).

    The gradient is taken at the model's parameters for the layers named; bias gradients sit in
    the last input column. Documents come back grouped by length, not in input order.
    """
    modules = {n: model.get_submodule(n) for n in layers}
    device = model_device(model)
    for batch in make_batches(docs, model.seq_len, model.tokenizer.pad_id, batch_tokens, max_batch_docs):
        a, g, _ = _batch_io(model, modules, batch, device, weighted=True, generator=None)
        n_docs = len(batch.docs)
        out = {}
        for n in layers:
            # a document's chunks are consecutive rows: view them as one long sequence per document
            gd = g[n].reshape(n_docs, -1, g[n].shape[-1])  # (n_docs, chunks*T, d_out)
            ad = a[n].reshape(n_docs, -1, a[n].shape[-1])  # (n_docs, chunks*T, d_in)
            out[n] = torch.bmm(gd.transpose(1, 2), ad)  # (n_docs, d_out, d_in)
        yield batch.docs, out


# ---------------------------------------------------------------- factors


@dataclass(frozen=True)
class LayerFactors:
    """Kronecker factors of one layer's Gauss-Newton matrix, in eigenform (float64, CPU)."""

    a_eigvecs: torch.Tensor  # (d_in, d_in) Q_A, columns are eigenvectors of A
    a_eigvals: torch.Tensor  # (d_in,)
    s_eigvecs: torch.Tensor  # (d_out, d_out) Q_S
    s_eigvals: torch.Tensor  # (d_out,)
    ekfac_eigvals: torch.Tensor | None  # (d_out, d_in) Lambda, None when only K-FAC was fitted
    n_examples: int  # sequences (chunks) the factors were fitted on
    n_tokens: int

    def eigvals(self, method: Method = "ekfac") -> torch.Tensor:
        """(d_out, d_in) eigenvalues of the approximate F in the Kronecker eigenbasis."""
        if method == "kfac":
            return torch.outer(self.s_eigvals.clamp(min=0), self.a_eigvals.clamp(min=0))
        if method == "ekfac":
            if self.ekfac_eigvals is None:
                raise ValueError("these factors have no EK-FAC eigenvalues; fit them with ekfac=True")
            return self.ekfac_eigvals
        raise ValueError(f"method = {method!r}; use 'ekfac' or 'kfac'")

    def matrix(self, method: Method = "ekfac") -> torch.Tensor:
        """The dense (d_in*d_out, d_in*d_out) approximation of F, column-major vec: for tests on tiny layers."""
        Q = torch.kron(self.a_eigvecs, self.s_eigvecs)
        lam = self.eigvals(method).T.reshape(-1)  # column-major vec of (d_out, d_in)
        return Q @ torch.diag(lam) @ Q.T


class FactorAccumulator:
    """Accumulates A, S (pass 1) and, once the eigenbasis is known, Lambda (pass 2) for one layer."""

    def __init__(self, d_out: int, d_in: int):
        self.a_sum = torch.zeros(d_in, d_in, dtype=torch.float64)
        self.s_sum = torch.zeros(d_out, d_out, dtype=torch.float64)
        self.lam_sum = torch.zeros(d_out, d_in, dtype=torch.float64)
        self.n_examples = self.n_tokens = self.n_lambda = 0
        self._basis: tuple[torch.Tensor, ...] | None = None

    def add_covariances(self, a: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> None:
        """a (R, T, d_in) zeroed on padding, g (R, T, d_out), mask (R, T)."""
        a2 = a.reshape(-1, a.shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        self.a_sum += (a2.T @ a2).double().cpu()
        self.s_sum += (g2.T @ g2).double().cpu()
        self.n_tokens += int(mask.sum())
        self.n_examples += a.shape[0]

    def eigendecompose(self) -> None:
        if self.n_examples == 0:
            raise ValueError("no examples were accumulated; give fit_texts")
        a_vals, a_vecs = torch.linalg.eigh(self.a_sum / self.n_tokens)
        s_vals, s_vecs = torch.linalg.eigh(self.s_sum / self.n_examples)
        self._basis = (a_vals, a_vecs, s_vals, s_vecs)

    def add_lambda(self, a: torch.Tensor, g: torch.Tensor) -> None:
        """Per-example gradients rotated into the Kronecker eigenbasis, squared and summed."""
        _, a_vecs, _, s_vecs = self._basis
        G = torch.bmm(g.transpose(1, 2), a)  # (R, d_out, d_in)
        rot = s_vecs.to(G).T @ G @ a_vecs.to(G)  # (R, d_out, d_in)
        self.lam_sum += (rot.double() ** 2).sum(0).cpu()
        self.n_lambda += a.shape[0]

    def factors(self) -> LayerFactors:
        a_vals, a_vecs, s_vals, s_vecs = self._basis
        lam = self.lam_sum / self.n_lambda if self.n_lambda else None
        return LayerFactors(a_vecs, a_vals, s_vecs, s_vals, lam, self.n_examples, self.n_tokens)


def factors_from_activations(a: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None = None) -> LayerFactors:
    """K-FAC + EK-FAC factors from in-memory per-token inputs a (N,T,d_in) and output grads g (N,T,d_out)."""
    mask = torch.ones(a.shape[:2], dtype=torch.bool) if mask is None else mask
    acc = FactorAccumulator(g.shape[-1], a.shape[-1])
    a = a * mask[..., None].to(a.dtype)
    acc.add_covariances(a, g, mask)
    acc.eigendecompose()
    acc.add_lambda(a, g)
    return acc.factors()


def fit_factors(
    model: nn.Module,
    texts: Sequence[str],
    layers: str | Sequence[str] = "attention",
    ekfac: bool = True,
    fisher: Fisher = "sampled",
    max_chunks: int = 1,
    batch_tokens: int = 8192,
    seed: int = 0,
) -> dict[str, LayerFactors]:
    """Fit K-FAC (and EK-FAC) factors of the chosen layers on `texts`; pure: returns the factors.

    Two passes over the texts (covariances, then the eigenvalue correction), each drawing the
    same sampled labels from a generator seeded with `seed`.
    """
    if fisher not in ("sampled", "empirical"):
        raise ValueError(f"fisher = {fisher!r}; use 'sampled' (true Fisher = Gauss-Newton) or 'empirical'")
    if len(texts) == 0:
        raise ValueError("fit_factors got no texts")
    names = resolve_layers(model, layers)
    modules = {n: model.get_submodule(n) for n in names}
    device = model_device(model)
    docs = tokenize_documents(model, texts, max_chunks)
    accs = {n: FactorAccumulator(*layer_shape(m)) for n, m in modules.items()}

    def passes():
        gen = None
        if fisher == "sampled":
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
        for batch in make_batches(docs, model.seq_len, model.tokenizer.pad_id, batch_tokens):
            yield _batch_io(model, modules, batch, device, weighted=False, generator=gen)

    for a, g, mask in passes():
        for n in names:
            accs[n].add_covariances(a[n], g[n], mask)
    for acc in accs.values():
        acc.eigendecompose()
    if ekfac:
        for a, g, _ in passes():
            for n in names:
                accs[n].add_lambda(a[n], g[n])
    return {n: acc.factors() for n, acc in accs.items()}


def save_factors(factors: Mapping[str, LayerFactors], path) -> None:
    """Write fitted factors (plain tensors, loadable with weights_only) so a pipeline can cache them."""
    torch.save({n: dict(vars(f)) for n, f in factors.items()}, path)


def load_factors(path) -> dict[str, LayerFactors]:
    return {n: LayerFactors(**d) for n, d in torch.load(path, map_location="cpu", weights_only=True).items()}


def damping_value(factors: LayerFactors, damping: float, method: Method = "ekfac", relative: bool = True) -> float:
    """Absolute damping of a layer: damping * mean eigenvalue when relative (0.1 x mean eigenvalue is
    the heuristic of Grosse et al. 2023, also kronfluence's ScoreArguments.damping default)."""
    if damping < 0:
        raise ValueError(f"damping = {damping!r}; must be >= 0")
    if not relative:
        return float(damping)
    return float(damping * factors.eigvals(method).mean().clamp(min=torch.finfo(torch.float64).tiny))


def ihvp(
    factors: Mapping[str, LayerFactors],
    grads: Mapping[str, torch.Tensor],
    damping: float = 0.1,
    method: Method = "ekfac",
    relative: bool = True,
) -> dict[str, torch.Tensor]:
    """(F + lambda I)^-1 v per layer; grads[name] is (..., d_out, d_in), returned in its dtype/device."""
    out = {}
    for name, v in grads.items():
        f = factors[name]
        lam = damping_value(f, damping, method, relative)
        if lam == 0 and bool((f.eigvals(method) <= 0).any()):
            raise ValueError(f"layer {name!r} has zero eigenvalues; give damping > 0")
        work = torch.float64 if v.dtype == torch.float64 else torch.float32
        qa = f.a_eigvecs.to(v.device, work)
        qs = f.s_eigvecs.to(v.device, work)
        eig = f.eigvals(method).to(v.device, work)
        rot = qs.T @ v.to(work) @ qa  # (..., d_out, d_in) in the eigenbasis
        out[name] = (qs @ (rot / (eig + lam)) @ qa.T).to(v.dtype)
    return out


def whiten(
    factors: Mapping[str, LayerFactors],
    grads: Mapping[str, torch.Tensor],
    damping: float = 0.1,
    method: Method = "ekfac",
    relative: bool = True,
) -> dict[str, torch.Tensor]:
    """(F + lambda I)^-1/2 v in the Kronecker eigenbasis, so <whiten(u), whiten(v)> = u^T (F + lambda I)^-1 v.

    Projecting whitened vectors keeps the JL error relative to the influence's own scale; projecting
    a preconditioned query and a raw gradient would multiply it by the preconditioner's dynamic range.
    """
    out = {}
    for name, v in grads.items():
        f = factors[name]
        lam = damping_value(f, damping, method, relative)
        work = torch.float64 if v.dtype == torch.float64 else torch.float32
        qa = f.a_eigvecs.to(v.device, work)
        qs = f.s_eigvecs.to(v.device, work)
        scale = (f.eigvals(method).to(v.device, work) + lam).rsqrt()
        out[name] = ((qs.T @ v.to(work) @ qa) * scale).to(v.dtype)  # (..., d_out, d_in)
    return out

