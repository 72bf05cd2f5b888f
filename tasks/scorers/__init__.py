"""Pluggable document scorers: each maps a pool document to a number, higher is better.

A scorer is one small class in one module of this package: a `name`, a `VERSION` (bumped when
its scores change), the inputs it `needs`, and `score(data) -> Scores`. Decorate it with
`@register` and it is found by name; every module here is imported on first use, so adding a
scorer touches one file (plus the name in `quadflow.settings.SCORERS` to make it configurable).

A scorer with `pool_wide = False` (influence) is too expensive to run on every document: the
score stage only fits it, and the select stage scores the documents the bandit probes with it.

Inputs a scorer may need (`ScoreInput`, loaded by the score task only when some scorer asks):
- "texts": the pool texts, ordered by doc_idx;
- "ngrams": the pool's hashed word 1+2-gram counts, a (n_docs, n_buckets) CSR matrix;
- "target_ngrams": the same for the target set (a scorer needing it cannot run without targets).

Fitting may also read `FitInput.pool_tokens`, every pool document's token count (the classifier
samples its negatives in proportion to tokens).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import polars as pl
from scipy import sparse

INPUTS = ("texts", "ngrams", "target_ngrams")


@dataclass(frozen=True)
class ScoreInput:
    """What scorers read: pool texts and hashed n-gram counts (pool and target), all by doc_idx."""

    n_docs: int
    texts: pl.Series | None = None  # (n_docs,) str
    ngrams: sparse.csr_matrix | None = None  # (n_docs, n_buckets) counts
    target_ngrams: sparse.csr_matrix | None = None  # (n_target, n_buckets) counts
    tokens: np.ndarray | None = None  # (n_docs,) int token counts (what FitInput.pool_tokens is made of)

    def require(self, name: str, scorer: str) -> Any:
        """The input `name`, or a clear error naming the scorer that needed it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"scorer {scorer!r} needs input {name!r}, which was not loaded")
        return value


@dataclass(frozen=True)
class FitInput:
    """What scorers learn from before scoring shard by shard: pool-wide statistics, never the whole pool.

    pool_totals: (n_buckets,) float64 exact sum of the pool's hashed n-gram counts;
    pool_rows(idx) -> (len(idx), n_buckets) CSR counts of chosen pool documents (idx sorted);
    pool_tokens: (n_pool,) token count of every pool document.
    """

    n_pool: int
    target_ngrams: sparse.csr_matrix | None = None
    pool_totals: np.ndarray | None = None
    pool_rows: Any = None  # Callable[[np.ndarray], sparse.csr_matrix]
    empty_docs: int = 0  # pool documents without any n-gram
    pool_tokens: np.ndarray | None = None  # (n_pool,) int64

    @classmethod
    def from_input(cls, data: "ScoreInput") -> "FitInput":
        """The same statistics from a whole pool held in memory (tests, benchmarks, small pools)."""
        tokens = None if data.tokens is None else np.asarray(data.tokens, dtype=np.int64)
        if data.ngrams is None:
            return cls(n_pool=data.n_docs, pool_tokens=tokens)
        ngrams = sparse.csr_matrix(data.ngrams)
        totals = np.asarray(ngrams.sum(axis=0, dtype=np.float64)).ravel()
        empty = int((np.diff(ngrams.indptr) == 0).sum())
        return cls(n_pool=data.n_docs, target_ngrams=data.target_ngrams, pool_totals=totals,
                   pool_rows=lambda idx: ngrams[np.asarray(idx)], empty_docs=empty, pool_tokens=tokens)

    def require(self, name: str, scorer: str) -> Any:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"scorer {scorer!r} needs {name!r} to fit, which was not loaded")
        return value


@dataclass(frozen=True)
class Scores:
    """A scorer's output: one score per pool document, an optional reason, and what to record."""

    score: np.ndarray  # (n_docs,) float64, higher is better
    detail: pl.Series | None = None  # (n_docs,) str, e.g. the failed heuristic rules
    params: dict[str, Any] = field(default_factory=dict)  # settings and fitted statistics -> score_info


class Scorer:
    """Base class: subclasses set name/VERSION/needs and implement score()."""

    name: ClassVar[str]
    VERSION: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    pool_wide: ClassVar[bool] = True  # False: fitted by the score stage, run on probed documents only

    def __init__(self, random_state: int = 0):
        self.random_state = random_state

    @classmethod
    def from_settings(cls, settings: Any, random_state: int) -> "Scorer":
        """Build from the score settings section; override to read scorer-specific settings."""
        return cls(random_state=random_state)

    @classmethod
    def needs_target(cls) -> bool:
        return "target_ngrams" in cls.needs

    def fit(self, data: FitInput) -> "Scorer":
        """Learn pool-wide state before scoring shard by shard (default: nothing to learn)."""
        return self

    def apply(self, data: ScoreInput) -> Scores:  # pragma: no cover - abstract
        """Score the documents of `data` (a shard or the whole pool) with the fitted state."""
        raise NotImplementedError(f"scorer {self.name!r} does not implement apply()")

    @classmethod
    def merge_params(cls, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """score_info params of the whole pool from each shard's (default: the fitted state, the same in every shard)."""
        return dict(parts[0]) if parts else {}

    def score(self, data: ScoreInput) -> Scores:
        """Fit on the pool in `data`, then score it: the in-memory path, the same numbers as shard by shard."""
        return self.fit(FitInput.from_input(data)).apply(data)

    def _checked(self, data: ScoreInput, result: Scores) -> Scores:
        """Guard the contract every caller relies on: one finite float per document."""
        s = np.asarray(result.score, dtype=np.float64)
        if s.shape != (data.n_docs,):
            raise ValueError(f"scorer {self.name!r} returned shape {s.shape} for {data.n_docs} documents")
        bad = np.flatnonzero(~np.isfinite(s))
        if bad.size:
            first = int(bad[0])
            raise ValueError(f"scorer {self.name!r} gave a non-finite score {float(s[first])!r} to doc {first}")
        if result.detail is not None and result.detail.len() != data.n_docs:
            raise ValueError(f"scorer {self.name!r} returned {result.detail.len()} details for {data.n_docs} docs")
        return Scores(score=s, detail=result.detail, params=result.params)

    def run(self, data: ScoreInput) -> Scores:
        """score() with its inputs and output checked."""
        for name in self.needs:
            data.require(name, self.name)
        return self._checked(data, self.score(data))

    def run_apply(self, data: ScoreInput) -> Scores:
        """apply() (after fit) with its inputs and output checked."""
        for name in self.needs - {"target_ngrams"}:
            data.require(name, self.name)
        return self._checked(data, self.apply(data))


REGISTRY: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make a scorer available by its name."""
    unknown = set(cls.needs) - set(INPUTS)
    if unknown:
        raise ValueError(f"scorer {cls.name!r} needs unknown inputs {sorted(unknown)}; known: {INPUTS}")
    old = REGISTRY.get(cls.name)
    # a reloaded module replaces its own entry; two different classes may not share a name
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"two scorers are named {cls.name!r}: {old} and {cls}")
    REGISTRY[cls.name] = cls
    return cls


_discovered = False


def _discover() -> None:
    """Import every module of this package once, so each registers its scorers."""
    global _discovered
    if not _discovered:
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")
        _discovered = True


def get_scorer(name: str) -> type[Scorer]:
    """The scorer class registered under `name`."""
    _discover()
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
