"""The proxy language model whose gradients the influence scorer reads.

Either a small causal transformer trained here on a seeded sample of the pool (byte-level, so it
needs no download), or a causal LM a user already has on disk (a Hugging Face checkpoint
directory, loaded with transformers when it is installed, never downloaded).

A proxy is an nn.Module with `forward(ids (B, T)) -> logits (B, T, V)`, a `tokenizer`
(see tokens.Tokenizer) and a `seq_len`.
"""

from __future__ import annotations

from .errors import require_torch

require_torch()  # a clear InfluenceUnavailable, not a bare ModuleNotFoundError

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quadflow.log import get_logger

from .errors import InfluenceUnavailable
from .tokens import document_tokens, make_tokenizer

CHECKPOINT_FORMAT = "quadflow-proxy-1"
CHECKPOINT_META = "quadflow-proxy.json"
CHECKPOINT_WEIGHTS = "model.pt"


@dataclass(frozen=True)
class ProxyConfig:
    """Architecture and training budget of the byte-level proxy LM."""

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int | None = None  # None: 4 * d_model
    seq_len: int = 256
    tokenizer: str = "bytes"  # 'bytes' (259 ids) or 'hashed-words' (word_buckets + 3 ids)
    word_buckets: int = 16384
    train_docs: int = 5000  # documents sampled (seeded) from the texts given to train_proxy
    max_doc_tokens: int = 2048  # tokens kept per sampled document, so long manuals don't dominate
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20

    def __post_init__(self):
        for name in ("n_layers", "d_model", "n_heads", "seq_len", "steps", "batch_size", "train_docs"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProxyConfig.{name} = {getattr(self, name)!r}; must be >= 1")
        if self.d_model % self.n_heads:
            raise ValueError(f"ProxyConfig.d_model = {self.d_model} is not divisible by n_heads = {self.n_heads}")

        make_tokenizer(self.tokenizer, self.word_buckets)  # validates the tokenizer settings

    @property
    def mlp_width(self) -> int:
        return self.d_mlp or 4 * self.d_model

    @property
    def vocab_size(self) -> int:
        return make_tokenizer(self.tokenizer, self.word_buckets).vocab_size


class Attention(nn.Module):
    """Causal self-attention with separate q, k, v, o projections (the layers influence reads)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = self.n_heads
        q = self.q_proj(x).view(B, T, h, C // h).transpose(1, 2)  # (B, h, T, C/h)
        k = self.k_proj(x).view(B, T, h, C // h).transpose(1, 2)
        v = self.v_proj(x).view(B, T, h, C // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, T, C/h)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.fc_in = nn.Linear(d_model, width, bias=False)
        self.fc_out = nn.Linear(width, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(nn.Module):
    def __init__(self, cfg: ProxyConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ProxyLM(nn.Module):
    """A small pre-LayerNorm GPT (nanoGPT-shaped) over bytes or hashed words, with tied embeddings."""

    def __init__(self, config: ProxyConfig):
        super().__init__()
        self.config = config
        self.tokenizer = make_tokenizer(config.tokenizer, config.word_buckets)
        self.seq_len = config.seq_len
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("o_proj.weight", "fc_out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        if T > self.seq_len:
            raise ValueError(f"sequence length {T} exceeds the proxy's seq_len {self.seq_len}")
        pos = torch.arange(T, device=ids.device)
        x = self.tok_emb(ids) + self.pos_emb(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, V)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_proxy(
    texts: Sequence[str],
    config: ProxyConfig | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> ProxyLM:
    """Train the proxy LM on a seeded sample of `texts` (next-token loss on packed windows)."""
    config = config or ProxyConfig()
    if len(texts) == 0:
        raise ValueError("train_proxy got no texts")
    device = torch.device(device) if device is not None else default_device()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = ProxyLM(config).to(device)
    tok = model.tokenizer

    pick = rng.choice(len(texts), size=min(config.train_docs, len(texts)), replace=False)
    stream = np.concatenate([document_tokens(tok, texts[i], config.max_doc_tokens) for i in np.sort(pick)])
    L = config.seq_len
    if len(stream) < L + 2:  # tiny corpora: repeat so one window fits
        stream = np.tile(stream, (L + 2) // len(stream) + 1)
    stream_t = torch.from_numpy(stream).to(device)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    log, start = get_logger(), time.monotonic()
    model.train()
    offsets = rng.integers(0, len(stream) - L - 1, size=(config.steps, config.batch_size))
    idx = torch.arange(L + 1, device=device)
    loss = torch.tensor(float("nan"))
    for step in range(config.steps):
        window = stream_t[torch.from_numpy(offsets[step]).to(device)[:, None] + idx]  # (B, L+1)
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == config.steps:
            log.info(f"proxy LM: step {step + 1}/{config.steps}, loss {loss.item():.3f} nats/token")
    model.eval()
    model.train_loss_ = float(loss.item())
    log.info(
        f"proxy LM: {n_params(model):,} parameters trained on {len(pick):,} documents "
        f"({len(stream):,} tokens) in {time.monotonic() - start:.1f}s on {device}"
    )
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_proxy(model: ProxyLM, path: str | Path) -> Path:
    """Write a proxy trained here to a directory (config JSON + state dict) that load_proxy reads."""
    if not isinstance(model, ProxyLM):
        raise TypeError(f"save_proxy saves a ProxyLM, got {type(model).__name__}; save other models with their own library")
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    meta = {"format": CHECKPOINT_FORMAT, "tokenizer": model.tokenizer.name, "config": asdict(model.config)}
    (p / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, p / CHECKPOINT_WEIGHTS)
    return p


def load_proxy(
    path: str | Path,
    device: str | torch.device | None = None,
    seq_len: int | None = None,
) -> nn.Module:
    """Load a proxy from a local directory: one saved by save_proxy, or a Hugging Face causal LM."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"proxy checkpoint {str(p)!r} is not a directory")
    device = torch.device(device) if device is not None else default_device()
    if (p / CHECKPOINT_META).exists():
        meta = json.loads((p / CHECKPOINT_META).read_text())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{p / CHECKPOINT_META} has format {meta.get('format')!r}; expected {CHECKPOINT_FORMAT!r}")
        model = ProxyLM(ProxyConfig(**meta["config"]))
        model.load_state_dict(torch.load(p / CHECKPOINT_WEIGHTS, map_location="cpu", weights_only=True))
        return model.to(device).eval()
    if (p / "config.json").exists():
        return _load_hf(p, device, seq_len)
    raise ValueError(
        f"{str(p)!r} holds neither a quadflow proxy ({CHECKPOINT_META}) nor a Hugging Face causal LM (config.json)"
    )


class HFTokenizer:
    """Adapter from a Hugging Face tokenizer to tokens.Tokenizer."""

    def __init__(self, tok):
        self._tok = tok
        self.name = f"hf:{getattr(tok, 'name_or_path', type(tok).__name__)}"
        self.vocab_size = len(tok)
        eos = tok.eos_token_id
        bos = tok.bos_token_id if tok.bos_token_id is not None else eos
        if bos is None or eos is None:
            raise ValueError(f"tokenizer {self.name!r} has neither a BOS nor an EOS token to mark document edges")
        self.bos_id, self.eos_id = int(bos), int(eos)
        self.pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def max_chars(self, n_tokens: int) -> int:
        return 16 * n_tokens  # subword tokens rarely span more than 16 characters


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM behind the proxy interface (ids -> logits)."""

    def __init__(self, model: nn.Module, tokenizer, seq_len: int | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = HFTokenizer(tokenizer)
        cfg = getattr(model, "config", None)
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 512
        self.seq_len = int(min(seq_len or 512, limit))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def _load_hf(p: Path, device: torch.device, seq_len: int | None) -> nn.Module:
    try:
        import transformers
    except ImportError as e:
        raise InfluenceUnavailable(
            f"{str(p)!r} holds a Hugging Face checkpoint; loading it needs transformers: pip install transformers"
        ) from e
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    return HFCausalLM(model, tok, seq_len).to(device).eval()
