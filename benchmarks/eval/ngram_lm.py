"""Interpolated modified Kneser-Ney trigram word model: the held-out perplexity yardstick for selections.

A selection is judged by training this model on the selected texts only and measuring its
perplexity on a held-out target set. Every model being compared shares one fixed `Vocab`
(top-V words of the target sample plus a fixed slice of the pool, everything else `<unk>`),
so no selection can lower its perplexity by changing which words count as unknown.

Tokens are lower-cased runs of word characters and single punctuation marks (the pattern of
`quadflow.text.TOKEN_PATTERN`, the one the token budget is counted in). Each non-empty line is
a sentence, padded as `<s> <s> w1 .. wn </s>`; `</s>` is predicted, `<s>` only conditions.

Smoothing follows Chen & Goodman (1998), "An Empirical Study of Smoothing Techniques for
Language Modeling" (TR-10-98, section 3): interpolated Kneser-Ney with three discounts per order
estimated from counts-of-counts, and KenLM's estimation choices (Heafield et al., 2013,
"Scalable Modified Kneser-Ney Language Model Estimation"): lower orders use continuation counts
except for n-grams that start with `<s>` (which cannot be extended to the left, so they keep
their raw counts), the unigram level interpolates with the uniform distribution, and an order
whose discounts are undefined or out of range falls back to (0.5, 1.0, 1.5) (KenLM's
`--discount_fallback`). Counts are numpy arrays over packed int64 keys, no dict per n-gram.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

import numpy as np
import polars as pl

from quadflow.text import TOKEN_PATTERN

UNK, BOS, EOS = 0, 1, 2
SPECIALS = ("<unk>", "<s>", "</s>")

# KenLM's --discount_fallback values (lm/builder/adjust_counts.cc), used when counts-of-counts
# cannot estimate an order's discounts (tiny corpora).
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)

# (u * B + v) * B + w must fit in int64: B**3 < 2**63.
MAX_VOCAB = 2_097_151


def tokenize_lines(texts: Iterable[str | None]) -> tuple[pl.Series, np.ndarray]:
    """Lower-cased tokens of every non-empty line, flattened, and the token count of each such line."""
    s = pl.Series("text", list(texts), dtype=pl.String).fill_null("")
    toks = s.str.split("\n").explode().str.to_lowercase().str.extract_all(TOKEN_PATTERN)
    toks = toks.filter(toks.list.len() > 0)  # a line with no token is no sentence
    lengths = toks.list.len().to_numpy().astype(np.int64)  # (lines,)
    return toks.explode(), lengths


class Vocab:
    """The fixed word list every compared model uses; ids 0-2 are <unk>, <s>, </s>."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        clash = [w for w in words if w in SPECIALS]
        if clash:
            raise ValueError(f"vocabulary words {clash!r} collide with the special tokens {SPECIALS!r}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary words must be unique")
        if len(words) + len(SPECIALS) > MAX_VOCAB:
            raise ValueError(f"vocabulary of {len(words):,} words is too large; at most {MAX_VOCAB - 3:,}")
        self.words = tuple(SPECIALS) + tuple(words)
        self._ids = np.arange(len(self.words), dtype=np.int32)
        self._index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts: Iterable[str | None], size: int = 50_000) -> "Vocab":
        """Top-`size` words of `texts` by frequency, ties broken alphabetically, so the list is reproducible."""
        if size < 1:
            raise ValueError(f"vocabulary size = {size!r}; it must be >= 1")
        toks, _ = tokenize_lines(texts)
        counts = toks.rename("word").value_counts(name="n").sort(["n", "word"], descending=[True, False])
        return cls(counts["word"].head(size).to_list())

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.words == other.words

    def __hash__(self) -> int:
        return hash(self.words)

    def id(self, word: str) -> int:
        """Id of `word` (<unk> when it is not in the vocabulary)."""
        return self._index.get(word, UNK)

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying the word list, for reports that compare models."""
        return hashlib.sha256("\n".join(self.words).encode("utf-8")).hexdigest()[:16]

    def encode(self, texts: Iterable[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of every sentence, flattened (int32), and the length of each sentence."""
        toks, lengths = tokenize_lines(texts)
        ids = toks.replace_strict(
            list(self.words), self._ids, default=UNK, return_dtype=pl.Int32
        ).to_numpy()
        return ids, lengths


def trigram_events(ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every predicted position (each token and each </s>) as a trigram (u, v, w) of int64 ids."""
    ids = np.asarray(ids, dtype=np.int32)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.sum() != ids.size:
        raise ValueError(f"sentence lengths sum to {int(lengths.sum())} but there are {ids.size} ids")
    block = lengths + 3  # <s> <s> w1 .. wn </s>
    starts = np.cumsum(block) - block  # (sentences,) offset of each padded sentence
    padded = np.full(int(block.sum()), BOS, dtype=np.int32)
    tok_start = np.cumsum(lengths) - lengths
    padded[np.arange(ids.size) + np.repeat(starts + 2 - tok_start, lengths)] = ids
    padded[starts + 2 + lengths] = EOS
    # A window whose last element is <s> crosses into the next sentence: not an event.
    valid = padded[2:] != BOS
    return (padded[:-2][valid].astype(np.int64), padded[1:-1][valid].astype(np.int64),
            padded[2:][valid].astype(np.int64))


def modified_kn_discounts(counts: np.ndarray) -> tuple[np.ndarray, bool]:
    """(D1, D2, D3+) from counts-of-counts (Chen & Goodman 1998, eq. 26); falls back when undefined."""
    c = np.asarray(counts, dtype=np.int64)
    n = [int(np.count_nonzero(c == k)) for k in (1, 2, 3, 4)]
    if min(n) > 0:
        y = n[0] / (n[0] + 2 * n[1])
        d = np.array([1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2]])
        if np.all(d > 0) and np.all(d <= np.array([1.0, 2.0, 3.0])):
            return d, False
    return np.array(FALLBACK_DISCOUNTS), True


def _discount(d: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Discount for each count: 0 for unseen, D1, D2, D3+ for 1, 2, >= 3."""
    return np.concatenate([[0.0], d])[np.minimum(counts, 3)]


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values[i] where keys[i] == query (keys sorted), 0 where the query is absent."""
    if keys.size == 0:
        return np.zeros(query.shape, dtype=values.dtype)
    i = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    return np.where(keys[i] == query, values[i], 0)


class KneserNeyTrigramLM:
    """Interpolated modified Kneser-Ney trigram model over a fixed vocabulary; deterministic, no sampling."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab

    # ---------------------------------------------------------------- fitting

    def fit(self, texts: Iterable[str | None]) -> "KneserNeyTrigramLM":
        """Count the trigrams of `texts` (the selection) and estimate every order's discounts."""
        return self.fit_events(*trigram_events(*self.vocab.encode(texts)))

    def fit_events(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> "KneserNeyTrigramLM":
        """Fit on trigram events (int id arrays of equal length) from `trigram_events`."""
        if u.size == 0:
            raise ValueError("no tokens to train on: the selection is empty")
        B = len(self.vocab)
        if max(int(u.max()), int(v.max()), int(w.max())) >= B or min(int(u.min()), int(v.min()), int(w.min())) < 0:
            raise ValueError(f"token ids must lie in [0, {B}) for this vocabulary")
        self.n_events_ = int(u.size)

        # Trigrams: raw counts c(uvw), and per context (u, v) its total and discount mass.
        keys3, c3 = np.unique((u * B + v) * B + w, return_counts=True)  # (types3,) sorted
        self.discounts3_, fb3 = modified_kn_discounts(c3)
        ctx, first = np.unique(keys3 // B, return_index=True)  # (contexts3,), keys3 sorted by context
        self.tri_keys_, self.tri_counts_ = keys3, c3
        self.ctx3_keys_ = ctx
        self.ctx3_total_ = np.add.reduceat(c3, first)
        self.ctx3_gamma_ = np.add.reduceat(_discount(self.discounts3_, c3), first)  # sum of discounts

        # Bigrams (v, w): continuation count N1+(. v w) = distinct u; raw count after <s>.
        keys2, inv, n_left = np.unique(keys3 % (B * B), return_inverse=True, return_counts=True)
        raw2 = np.bincount(inv, weights=c3).astype(np.int64)
        v2 = keys2 // B
        a2 = np.where(v2 == BOS, raw2, n_left)  # (types2,) adjusted counts
        self.discounts2_, fb2 = modified_kn_discounts(a2)
        self.bi_keys_, self.bi_counts_ = keys2, a2
        self.ctx2_total_ = np.bincount(v2, weights=a2, minlength=B)  # (B,)
        self.ctx2_gamma_ = np.bincount(v2, weights=_discount(self.discounts2_, a2), minlength=B)

        # Unigrams: N1+(. w) = distinct v before w; interpolated with the uniform over predictable words.
        a1 = np.bincount(keys2 % B, minlength=B)  # (B,)
        self.unigram_counts_ = a1
        self.discounts1_, fb1 = modified_kn_discounts(a1[a1 > 0])
        d1 = _discount(self.discounts1_, a1)
        total1 = a1.sum()
        n_pred = B - 1  # every id but <s>
        p1 = (a1 - d1) / total1 + (d1.sum() / total1) / n_pred
        p1[BOS] = 0.0
        self.p1_ = p1
        self.discount_fallback_ = {1: fb1, 2: fb2, 3: fb3}
        return self

    def count(self, *words: str) -> int:
        """The count an order smooths with: raw for trigrams, continuation (KN) for bigrams and unigrams."""
        B = len(self.vocab)
        ids = [self.vocab.id(x) for x in words]
        if len(ids) == 3:
            return int(_lookup(self.tri_keys_, self.tri_counts_, np.int64((ids[0] * B + ids[1]) * B + ids[2])))
        if len(ids) == 2:
            return int(_lookup(self.bi_keys_, self.bi_counts_, np.int64(ids[0] * B + ids[1])))
        if len(ids) == 1:
            return int(self.unigram_counts_[ids[0]])
        raise ValueError(f"count() takes 1 to 3 words, got {words!r}")

    # ---------------------------------------------------------------- scoring

    def prob(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        """P(w | u v) for arrays of ids (broadcast together)."""
        B = len(self.vocab)
        u, v, w = np.broadcast_arrays(*(np.asarray(x, dtype=np.int64) for x in (u, v, w)))
        p1 = self.p1_[w]
        a2 = _lookup(self.bi_keys_, self.bi_counts_, v * B + w)
        tot2 = self.ctx2_total_[v]
        seen2 = tot2 > 0
        den2 = np.where(seen2, tot2, 1.0)
        p2 = np.where(seen2, (a2 - _discount(self.discounts2_, a2) + self.ctx2_gamma_[v] * p1) / den2, p1)
        ctx = u * B + v
        c3 = _lookup(self.tri_keys_, self.tri_counts_, ctx * B + w)
        tot3 = _lookup(self.ctx3_keys_, self.ctx3_total_, ctx)
        gam3 = _lookup(self.ctx3_keys_, self.ctx3_gamma_, ctx)
        seen3 = tot3 > 0
        den3 = np.where(seen3, tot3, 1)
        return np.where(seen3, (c3 - _discount(self.discounts3_, c3) + gam3 * p2) / den3, p2)

    def distribution(self, u: str, v: str) -> np.ndarray:
        """P(. | u v) over every vocabulary id (P(<s>) = 0): sums to 1."""
        B = len(self.vocab)
        p = self.prob(np.full(B, self.vocab.id(u)), np.full(B, self.vocab.id(v)), np.arange(B))
        p[BOS] = 0.0
        return p

    def score(self, texts: Iterable[str | None]) -> dict:
        """Log-likelihood of `texts` in nats, with event and <unk> counts."""
        u, v, w = trigram_events(*self.vocab.encode(texts))
        if w.size == 0:
            raise ValueError("no tokens to score: the evaluation texts are empty")
        logp = np.log(self.prob(u, v, w))
        ll = float(logp.sum())
        return {
            "log_likelihood": ll,
            "events": int(w.size),
            "unk_rate": float(np.mean(w == UNK)),
            "cross_entropy": -ll / w.size,  # nats per predicted token
            "perplexity": math.exp(-ll / w.size),
        }

    def perplexity(self, texts: Iterable[str | None]) -> float:
        """exp(mean negative log-likelihood) over every token and </s> of `texts`."""
        return self.score(texts)["perplexity"]
