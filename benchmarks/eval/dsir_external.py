"""The reference DSIR baseline: the authors' own package (PyPI `data-selection`, p-lambda/dsir), unmodified.

Xie et al. (2023), "Data Selection for Language Models via Importance Resampling": hashed
unigram+bigram counts (10,000 buckets, nltk's WordPunct tokenizer), log importance weight
`log p_target(x) - log p_raw(x)` per document, then resampling without replacement by Gumbel
top-k. quadflow's own DSIR scorer is compared against this run of the published code.

How the package is driven (read from data_selection 1.0.3, base.py and hashed_ngram_dsir.py):

- `HashedNgramDSIR(raw, target, cache_dir, num_proc, ...)`, `fit_importance_estimator()`
  (raw counts over up to 100k tokens per bucket, i.e. the whole pool here; target over all of it),
  `compute_importance_weights()` (writes one .npy of log weights per virtual shard, shard s of n
  holding lines s, s+n, ...), `resample(out_dir, num_to_sample)`.
- It drops documents shorter than `min_example_length` (100 wordpunct tokens by default) before
  resampling: on a pool of short dictionary entries that removes most documents; kept as published.
- `resample()` draws its Gumbel noise from numpy's *global*, unseeded RNG
  (`np.random.gumbel(size=...)`). We call `np.random.seed(seed)` right before it (and restore the
  caller's global state after), so a run is reproducible.
- `resample()` takes a number of documents, not tokens, and writes the chosen lines in file order,
  not in resampled order. We rebuild the resampled order from the same seeded draw
  (`RandomState(seed).gumbel` gives the same numbers as the seeded global draw), ask the package
  for enough documents to hold `oversample` x the budget, check that its chosen set equals the
  head of our order (a mismatch raises), and walk that order taking each document that still fits
  the budget (the pipeline's `fill_budget` rule): never over budget, filled as far as it goes.
- The Gumbel noise is drawn over the package's shard-by-shard concatenation, so a selection is
  reproducible for a given (seed, num_proc), not across different num_proc.
- nltk >= 3.10 wraps the tokenizer's pattern in a timeout guard whose private sentinel does not
  survive pickling: once the package's module-level tokenizer has run in this process, its
  multi-process mode fails with "timeout not float or None". We hand it a fresh WordPunctTokenizer
  (the same class `tokenizer='wordpunct'` picks), which compiles inside each worker.
- Budget tokens are quadflow tokens (`quadflow.text.TOKEN_PATTERN`), as for every other method.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.eval.tasks import iter_lines
from quadflow.text import count_tokens_expr


@dataclass(frozen=True)
class DsirResult:
    """What the external DSIR run selected, in resampled order, and what it cost."""

    ids: list[str]
    tokens: int
    candidates: int  # pool documents left after DSIR's length filter
    resampled: int  # documents the package resampled before trimming to the budget
    seconds: dict[str, float] = field(default_factory=dict)  # stage, fit, weights, resample
    package_version: str = ""


@contextmanager
def _seeded_global_rng(seed: int):
    """Seed numpy's global RNG for the package's unseeded Gumbel draw; give the caller its state back."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _stage(src: str | Path, dst: Path) -> tuple[list[str], np.ndarray]:
    """Copy records as {"id", "text"} JSON lines the package's default loader reads; ids and token counts."""
    ids: list[str] = []
    counts: list[np.ndarray] = []
    batch: list[str] = []

    def flush():
        if batch:
            frame = pl.DataFrame({"text": batch}, schema={"text": pl.String})
            counts.append(frame.select(count_tokens_expr())["text"].to_numpy())
            batch.clear()

    with open(dst, "w", encoding="utf-8") as out:
        for line in iter_lines(src):
            rec = json.loads(line)
            text = rec.get("text") if isinstance(rec.get("text"), str) else ""
            ids.append(str(rec["id"]))
            batch.append(text)
            out.write(json.dumps({"id": ids[-1], "text": text}) + "\n")  # ASCII-escaped: no stray line breaks
            if len(batch) >= 50_000:
                flush()
    flush()
    return ids, (np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64))


def _fill(tokens: np.ndarray, budget: int) -> np.ndarray:
    """Positions (into `tokens`, walked in order) of each document that still fits the budget."""
    taken = []
    remaining = int(budget)
    for i, t in enumerate(tokens.tolist()):
        if t <= remaining:
            taken.append(i)
            remaining -= t
            if remaining == 0:
                break
    return np.asarray(taken, dtype=np.int64)


def dsir_select(
    pool_path: str | Path,
    target_path: str | Path,
    budget_tokens: int,
    *,
    seed: int = 0,
    num_proc: int = 2,
    num_buckets: int = 10_000,
    ngrams: int = 2,
    min_example_length: int = 100,
    num_tokens_to_fit: int | str = "auto",
    oversample: float = 1.25,
    work_dir: str | Path | None = None,
) -> DsirResult:
    """Run the published DSIR on a pool and a target (JSONL, plain/.gz/.zst) and trim its resample to the budget.

    Defaults are the package's (10k buckets, uni+bigrams, min_example_length 100, raw fit 'auto').
    `work_dir` keeps the package's cache (weights, resampled shards); a temporary one is removed.
    """
    import data_selection
    from data_selection import HashedNgramDSIR
    from nltk.tokenize import WordPunctTokenizer

    if budget_tokens <= 0:
        raise ValueError(f"budget_tokens = {budget_tokens!r}; it must be > 0")
    if oversample < 1:
        raise ValueError(f"oversample = {oversample!r}; it must be >= 1")
    with tempfile.TemporaryDirectory(prefix="dsir-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        seconds: dict[str, float] = {}

        t0 = time.perf_counter()
        ids, tokens = _stage(pool_path, work / "raw.jsonl")
        _stage(target_path, work / "target.jsonl")
        seconds["stage"] = time.perf_counter() - t0

        dsir = HashedNgramDSIR(
            raw_datasets=[str(work / "raw.jsonl")],
            target_datasets=[str(work / "target.jsonl")],
            cache_dir=str(work / "cache"),
            num_proc=num_proc,
            ngrams=ngrams,
            num_buckets=num_buckets,
            tokenizer="wordpunct",  # word_tokenize would need nltk's punkt download
            min_example_length=min_example_length,
        )
        # Not yet compiled, so it pickles to joblib workers under nltk >= 3.10 (see the module docstring).
        dsir.tokenizer = WordPunctTokenizer().tokenize
        t0 = time.perf_counter()
        dsir.fit_importance_estimator(num_tokens_to_fit=num_tokens_to_fit)
        seconds["fit"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        dsir.compute_importance_weights()
        seconds["weights"] = time.perf_counter() - t0

        # The package's concatenation order: shard by shard, shard s holding lines s, s+n, ...
        shards = dsir._get_virtually_sharded_datasets(dsir.raw_datasets)
        logw, length, line = [], [], []
        for sp in shards:
            logw.append(np.load(dsir.log_importance_weights_dir / f"{sp['overall_idx']}.npy"))
            length.append(np.load(dsir.perexample_metadata_dir / f"{sp['overall_idx']}.npy"))
            line.append(np.arange(sp["shard_idx"], len(ids), sp["num_shards"]))
        logw, length, line = np.concatenate(logw), np.concatenate(length), np.concatenate(line)
        if logw.size != len(ids):
            raise RuntimeError(f"DSIR wrote {logw.size} weights for {len(ids)} pool documents")

        cand = np.flatnonzero(dsir.perexample_metadata_filter(length))  # (candidates,)
        keys = logw[cand] + np.random.RandomState(seed).gumbel(size=cand.size)
        order = line[cand[np.argsort(-keys, kind="stable")]]  # pool lines in resampled order
        csum = np.cumsum(tokens[order])
        if csum.size == 0 or csum[-1] < budget_tokens:
            raise ValueError(
                f"DSIR keeps {cand.size:,} documents of >= {min_example_length} tokens holding "
                f"{int(csum[-1]) if csum.size else 0:,} tokens, less than the budget of {budget_tokens:,}"
            )
        k = int(np.searchsorted(csum, oversample * budget_tokens, side="left")) + 1
        k = min(k, cand.size - 1)  # resample() uses argpartition(kth=num_to_sample) < candidates

        t0 = time.perf_counter()
        with _seeded_global_rng(seed):
            dsir.resample(out_dir=str(work / "resampled"), num_to_sample=k)
        seconds["resample"] = time.perf_counter() - t0

        chosen = set()
        for f in sorted((work / "resampled").glob("*.jsonl")):
            chosen.update(json.loads(ln)["id"] for ln in f.read_text(encoding="utf-8").splitlines() if ln)
        head = order[:k]
        if chosen != {ids[i] for i in head}:
            raise RuntimeError(
                f"data-selection {data_selection.__version__} resampled {len(chosen)} documents that differ "
                f"from the reproduced Gumbel order's first {k}: its resample() changed; revisit this module"
            )
        keep = head[_fill(tokens[head], budget_tokens)]
        return DsirResult(
            ids=[ids[i] for i in keep],
            tokens=int(tokens[keep].sum()),
            candidates=int(cand.size),
            resampled=k,
            seconds={name: round(s, 3) for name, s in seconds.items()},
            package_version=data_selection.__version__,
        )


def dsir_selected_ids(pool_path: str | Path, target_path: str | Path, budget_tokens: int, seed: int = 0,
                      **kwargs) -> list[str]:
    """Ids the published DSIR selects within the budget, in its resampled order."""
    return dsir_select(pool_path, target_path, budget_tokens, seed=seed, **kwargs).ids
