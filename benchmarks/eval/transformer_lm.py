"""A tiny causal transformer trained on a selection for a fixed number of tokens: the second opinion.

The Kneser-Ney trigram (ngram_lm.py) judges a selection by its word statistics; this judges it
the way a selection is meant to be used, by the held-out loss of a transformer trained on it.
Every method of a comparison gets the same model, seed, tokenizer and number of training tokens,
so the selections' texts are the only difference.

- Tokenizer: UTF-8 bytes plus BOS, EOS and PAD (259 ids; `ByteTokenizer` of the influence
  scorer, tasks/scorers/influence/tokens.py). Fixed and fitted on nothing, so no selection and no
  target can shape it. ('hashed-words', CRC-32 of quadflow's budget tokens into buckets, is the
  other fixed choice.)
- Model: the influence scorer's proxy (`ProxyLM`, tasks/scorers/influence/proxy.py): a
  pre-LayerNorm GPT with tied embeddings, nanoGPT-shaped, no dropout.
- Training: each selected document becomes [BOS, bytes, EOS]; the documents are concatenated
  and cut into non-overlapping windows of seq_len + 1 ids (stride seq_len). Windows are visited
  in a seeded random order, reshuffled after each pass, `batch_size` per step, for
  ceil(train_tokens / (batch_size * seq_len)) steps: a selection smaller than the token budget
  is seen more than once, a larger one in part. AdamW, linear warmup, cosine decay to 10%.
- Evaluation: each held-out document from scratch ([BOS, bytes, EOS], cut into chunks of seq_len
  whose context restarts), every byte and the EOS predicted once; above `max_eval_tokens`, a
  seeded random subset of those chunks (the same for every model: the held-out set is encoded
  once), so every held-out position is equally likely to count. `perplexity` is per predicted
  byte (exp of the mean negative log-likelihood, nats); `word_perplexity` spreads the same total
  log-likelihood over the text's quadflow tokens (quadflow.text.TOKEN_PATTERN): a text's
  likelihood does not depend on how it is tokenized, so this sits on the trigram's per-word scale
  (nearly: the trigram also predicts one </s> per line and maps rare words to <unk>).

torch is needed (pip install -e '.[influence]'); this module imports it only when a model is
built, so the harness can ask `plan_transformer` whether to run without it. Device: cuda when
torch.cuda.is_available(), else cpu. On CPU the same seed and thread count give the same
numbers; CUDA kernels may differ in the last digits between runs.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator

import numpy as np
import polars as pl

from quadflow.text import count_tokens_expr

TORCH_HINT = "the transformer second opinion needs torch: pip install -e '.[influence]'"
TRANSFORMER_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class TransformerLMConfig:
    """Architecture, token budget and evaluation limits of the second-opinion model."""

    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    seq_len: int = 256  # context in tokens (bytes)
    tokenizer: str = "bytes"  # 'bytes' (259 ids) or 'hashed-words'
    word_buckets: int = 16384  # hashed-words only
    train_tokens: int = 2_000_000  # predicted tokens per training run, the same for every selection
    batch_size: int = 16  # windows per step
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.05  # share of the steps with a linear warmup
    eval_batch_tokens: int = 32_768  # padded tokens per evaluation forward pass
    max_eval_tokens: int | None = None  # cap on held-out tokens (a seeded sample of chunks); None: all
    threads: int | None = None  # torch CPU threads while training/scoring; None: torch's default

    def __post_init__(self):
        for name in ("n_layers", "d_model", "n_heads", "seq_len", "train_tokens", "batch_size", "eval_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransformerLMConfig.{name} = {getattr(self, name)!r}; must be >= 1")
        if self.d_model % self.n_heads:
            raise ValueError(f"TransformerLMConfig.d_model = {self.d_model} is not divisible by "
                             f"n_heads = {self.n_heads}")
        if self.lr <= 0 or not 0 <= self.warmup_frac < 1:
            raise ValueError(f"lr = {self.lr!r} must be > 0 and warmup_frac = {self.warmup_frac!r} in [0, 1)")
        if self.max_eval_tokens is not None and self.max_eval_tokens < 1:
            raise ValueError(f"max_eval_tokens = {self.max_eval_tokens!r}; must be >= 1 or None")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads = {self.threads!r}; must be >= 1 or None")
        if self.tokenizer not in ("bytes", "hashed-words"):
            raise ValueError(f"tokenizer = {self.tokenizer!r}; use 'bytes' or 'hashed-words'")

    @property
    def steps(self) -> int:
        return -(-self.train_tokens // (self.batch_size * self.seq_len))


# Presets. 'small' (3.3M parameters, 256-byte context; 2M bytes = 489 steps of 16 windows) is for
# a GPU. 'tiny' (70k parameters, 64-byte context, 600k bytes = 1,172 steps of 8 windows, 1 thread)
# is for a CPU: 8-13 s per selection on this repository's shared 2-core machine (2026-11-23),
# held-out scoring included. Measured there on the python-docs quick pool (400 KB selections):
# with 200k training bytes or lr 3e-3, one training seed in three landed 1.5-5 perplexity points
# away from the other two, as much as the gaps between methods; with 600k bytes and lr 2e-3 the
# three seeds agree within 0.3 (random 14.6-14.9, top-k DSIR 11.2-11.4 per byte). Smaller
# batches beat larger ones here: at a fixed token count a model this size gains more from steps.
PRESETS = {
    "small": TransformerLMConfig(),
    "tiny": TransformerLMConfig(n_layers=1, d_model=64, n_heads=2, seq_len=64, train_tokens=600_000, batch_size=8,
                                lr=2e-3, eval_batch_tokens=16_384, max_eval_tokens=1_000_000, threads=1),
}


# ------------------------------------------------------------------------------------ where to run


@dataclass(frozen=True)
class TransformerPlan:
    """Whether the second opinion runs, on which device, and why (or why not)."""

    run: bool
    device: str | None  # 'cuda' or 'cpu' when it runs
    reason: str


def torch_available() -> bool:
    """Whether torch is importable, checked without importing it."""
    return importlib.util.find_spec("torch") is not None


def plan_transformer(mode: str, cuda_available: Callable[[], bool] | None = None) -> TransformerPlan:
    """auto: only with a GPU; on: on the GPU if there is one, else on the CPU; off: never.

    Raises ValueError for an unknown mode, or for 'on' without torch (asked for, cannot run).
    """
    if mode not in TRANSFORMER_MODES:
        raise ValueError(f"transformer mode = {mode!r}; use one of {', '.join(TRANSFORMER_MODES)}")
    if mode == "off":
        return TransformerPlan(False, None, "skipped: --transformer off")
    if not torch_available():
        if mode == "on":
            raise ValueError(f"--transformer on: {TORCH_HINT}")
        return TransformerPlan(False, None, f"skipped: torch is not installed ({TORCH_HINT})")
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available
    if cuda_available():
        return TransformerPlan(True, "cuda", f"on cuda ({_gpu_name()}), --transformer {mode}")
    if mode == "auto":
        return TransformerPlan(False, None, "skipped: no GPU (torch.cuda.is_available() is False); "
                                            "--transformer on runs it on the CPU")
    return TransformerPlan(True, "cpu", "on cpu (no GPU: torch.cuda.is_available() is False), --transformer on")


def _gpu_name() -> str:
    """The first GPU's name, for the record ('unknown GPU' where torch cannot say)."""
    import torch

    try:
        return torch.cuda.get_device_name(0)
    except (RuntimeError, AssertionError):
        return "unknown GPU"


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch's CPU thread count set to n (None: unchanged) for the block, then restored (it is process-wide)."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------ data


def _tokenizer(config: TransformerLMConfig):
    from quadflow.tasks.scorers.influence.tokens import make_tokenizer

    return make_tokenizer(config.tokenizer, config.word_buckets)


def document_ids(tokenizer: Any, text: str | None) -> np.ndarray:
    """[BOS, tokens of text, EOS] as int64, nothing cut."""
    body = tokenizer.encode(text or "")
    return np.concatenate([[tokenizer.bos_id], body, [tokenizer.eos_id]]).astype(np.int64)


@dataclass(frozen=True)
class EvalSet:
    """Held-out text encoded once as the chunks a model scores, shared by every model of a comparison."""

    chunks: list[np.ndarray]  # each (n_i + 1,) int64 ids, n_i <= seq_len targets; context restarts per chunk
    tokens: int  # predicted ids: sum of n_i
    words: int  # quadflow tokens in the text the chunks cover (a word cut by a chunk edge counts on both sides)
    chunks_total: int  # chunks of the whole held-out set (more than len(chunks) when max_eval_tokens sampled)


def encode_eval(texts: Sequence[str | None], config: TransformerLMConfig, random_state: int = 0) -> EvalSet:
    """Cut each held-out document ([BOS, tokens, EOS]) into chunks of seq_len targets; above max_eval_tokens,
    keep a seeded random subset of the chunks (every position equally likely, so the mean loss is unbiased)."""
    from quadflow.tasks.scorers.influence.tokens import chunk_spans

    tok = _tokenizer(config)
    chunks = []
    for t in texts:
        ids = document_ids(tok, t)
        chunks += [ids[a:b] for a, b in chunk_spans(ids.size, config.seq_len)]
    if not chunks:
        raise ValueError("no held-out texts to score")
    total = len(chunks)
    sizes = np.array([c.size - 1 for c in chunks], dtype=np.int64)  # (chunks,) targets per chunk
    if config.max_eval_tokens is not None and sizes.sum() > config.max_eval_tokens:
        order = np.random.default_rng(random_state).permutation(total)
        n = max(1, int(np.searchsorted(np.cumsum(sizes[order]), config.max_eval_tokens, side="right")))
        chunks = [chunks[i] for i in np.sort(order[:n])]
    words = int(pl.DataFrame({"text": [_chunk_text(tok, c) for c in chunks]}, schema={"text": pl.String})
                .select(count_tokens_expr().sum()).item())
    return EvalSet(chunks, int(sum(c.size - 1 for c in chunks)), words, total)


def _chunk_text(tok: Any, ids: np.ndarray) -> str:
    """The text a chunk's predicted ids spell (for the per-word scale): bytes decoded, or one 'w' per hashed word."""
    body = ids[1:]
    body = body[body < tok.bos_id]  # specials (BOS, EOS, PAD) sit above the byte / bucket ids
    if tok.vocab_size == 259:
        return bytes(body.astype(np.uint8).tolist()).decode("utf-8", errors="ignore")
    return " w" * body.size


# ------------------------------------------------------------------------------------ the model


class TransformerLM:
    """A tiny causal transformer trained on given texts for exactly config.steps batches; held-out loss."""

    def __init__(self, config: TransformerLMConfig | None = None, random_state: int = 0, device: str | None = None):
        self.config = config
        self.random_state = random_state
        self.device = device  # None: cuda when available, else cpu

    def _config(self) -> TransformerLMConfig:
        return self.config if self.config is not None else PRESETS["tiny"]

    def fit(self, texts: Sequence[str | None]) -> "TransformerLM":
        """Train on `texts` (the selection) from a seeded initialization; nothing else is seen."""
        import torch
        import torch.nn.functional as F

        from quadflow.tasks.scorers.influence.proxy import ProxyConfig, ProxyLM, n_params

        cfg = self._config()
        start = time.perf_counter()
        self.device_ = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tok = _tokenizer(cfg)
        docs = [document_ids(tok, t) for t in texts]
        if not docs or sum(d.size - 2 for d in docs) == 0:
            raise ValueError("no tokens to train on: the selection is empty")
        stream = np.concatenate(docs)  # (S,) every selected document, BOS ... EOS, in the given order
        self.corpus_tokens_ = int(stream.size - 1)
        L, B = cfg.seq_len, cfg.batch_size
        if stream.size < L + 1:  # a selection shorter than one window: repeat it
            stream = np.tile(stream, (L + 1) // stream.size + 1)
        n_windows = (stream.size - 1) // L  # (n_windows,) starts 0, L, 2L, ...; the tail after the last is unused
        rng = np.random.default_rng(self.random_state)
        order = np.concatenate([rng.permutation(n_windows) for _ in range(-(-cfg.steps * B // n_windows))])
        starts = order[: cfg.steps * B].reshape(cfg.steps, B) * L  # (steps, B) window starts

        with _threads(cfg.threads):
            with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
                torch.manual_seed(self.random_state)
                model = ProxyLM(ProxyConfig(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads,
                                            seq_len=L, tokenizer=cfg.tokenizer, word_buckets=cfg.word_buckets))
            model.to(self.device_).train()
            stream_t = torch.from_numpy(stream).to(self.device_)
            starts_t = torch.from_numpy(starts).to(self.device_)
            idx = torch.arange(L + 1, device=self.device_)
            decay = [p for p in model.parameters() if p.dim() >= 2]
            no_decay = [p for p in model.parameters() if p.dim() < 2]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
            warmup = max(1, int(cfg.warmup_frac * cfg.steps))
            losses = np.zeros(cfg.steps)
            for step in range(cfg.steps):
                if step < warmup:
                    lr = cfg.lr * (step + 1) / warmup
                else:  # cosine decay to 10% of the peak
                    frac = (step - warmup) / max(1, cfg.steps - warmup)
                    lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
                for group in opt.param_groups:
                    group["lr"] = lr
                window = stream_t[starts_t[step][:, None] + idx]  # (B, L+1)
                logits = model(window[:, :-1])  # (B, L, V)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses[step] = loss.item()
        model.eval()
        self.model_ = model
        self.n_params_ = n_params(model)
        self.steps_ = cfg.steps
        self.train_tokens_ = cfg.steps * B * L
        self.epochs_ = self.train_tokens_ / self.corpus_tokens_
        self.train_loss_ = float(losses[-max(1, cfg.steps // 10):].mean())  # nats/token, last 10% of steps
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def score(self, heldout: Sequence[str | None] | EvalSet) -> dict[str, Any]:
        """Held-out negative log-likelihood (nats) per predicted token and per quadflow word, and both perplexities."""
        import torch
        import torch.nn.functional as F

        from quadflow.tasks.scorers.influence.tokens import IGNORE, make_batches

        if not hasattr(self, "model_"):
            raise RuntimeError("TransformerLM is not fitted; call fit(selected_texts) first")
        cfg = self._config()
        start = time.perf_counter()
        evalset = heldout if isinstance(heldout, EvalSet) else encode_eval(heldout, cfg)
        pad = self.model_.tokenizer.pad_id
        total = 0.0
        with _threads(cfg.threads), torch.inference_mode():
            for batch in make_batches(evalset.chunks, cfg.seq_len, pad, cfg.eval_batch_tokens):
                inputs = torch.from_numpy(batch.inputs).to(self.device_)  # (R, W)
                targets = torch.from_numpy(batch.targets).to(self.device_)  # (R, W), IGNORE on padding
                logits = self.model_(inputs)  # (R, W, V)
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                               ignore_index=IGNORE, reduction="sum"))
        nll = total / evalset.tokens
        return {
            "perplexity": math.exp(nll),  # per predicted token (byte, with the tokenizer 'bytes')
            "nll": nll,  # nats per predicted token
            "word_perplexity": math.exp(total / evalset.words) if evalset.words else None,
            "eval_tokens": evalset.tokens, "eval_words": evalset.words, "eval_chunks": len(evalset.chunks),
            "eval_chunks_total": evalset.chunks_total,
            "eval_seconds": time.perf_counter() - start,
        }

    def perplexity(self, heldout: Sequence[str | None] | EvalSet) -> float:
        """exp(mean negative log-likelihood) per predicted token of the held-out texts."""
        return self.score(heldout)["perplexity"]


def evaluate_transformer(selected_texts: Sequence[str | None], heldout: Sequence[str | None] | EvalSet,
                         config: TransformerLMConfig | None = None, random_state: int = 0,
                         device: str | None = None) -> dict[str, Any]:
    """One selection's second opinion: a fresh model trained on it alone, scored on the held-out set (row columns)."""
    lm = TransformerLM(config, random_state, device).fit(selected_texts)
    held = lm.score(heldout)
    return {
        "ppl_transformer": held["perplexity"],
        "ppl_transformer_word": held["word_perplexity"],
        "transformer_nll": held["nll"],
        "transformer_train_loss": lm.train_loss_,
        "transformer_train_tokens": lm.train_tokens_,
        "transformer_epochs": lm.epochs_,
        "transformer_eval_tokens": held["eval_tokens"],
        "transformer_device": str(lm.device_),
        "transformer_seconds": round(lm.fit_seconds_ + held["eval_seconds"], 3),
    }


TRANSFORMER_COLUMNS = ("ppl_transformer", "ppl_transformer_word", "transformer_nll", "transformer_train_loss",
                       "transformer_train_tokens", "transformer_epochs", "transformer_eval_tokens",
                       "transformer_device", "transformer_seconds")


def describe(config: TransformerLMConfig, preset: str | None = None) -> dict[str, Any]:
    """The config as recorded next to results (with the parameter count and steps it implies)."""
    d = config.d_model
    vocab = 259 if config.tokenizer == "bytes" else config.word_buckets + 3
    params = vocab * d + config.seq_len * d + config.n_layers * (12 * d * d + 4 * d) + 2 * d  # tied head
    return {"preset": preset, **asdict(config), "steps": config.steps, "params": params}


def preset(name: str, **overrides: Any) -> TransformerLMConfig:
    """A named preset with some fields replaced (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"transformer preset = {name!r}; use one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
