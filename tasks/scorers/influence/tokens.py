"""Tokenizers (bytes, or hashed words) and document chunking for the proxy LM: no download, any language.

Each document becomes [BOS, tokens..., EOS]. It is cut into chunks of `seq_len` inputs; chunk c
predicts tokens c*seq_len+1 .. (c+1)*seq_len, so every target is predicted exactly once. Only the
first `max_chunks` chunks of a document count (long manuals are judged by their opening).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np

from quadflow.text import TOKEN_PATTERN

IGNORE = -100  # target id that the loss skips (torch's cross_entropy default ignore_index)
_WORD_RE = re.compile(TOKEN_PATTERN)


class Tokenizer(Protocol):
    """What the influence code needs from a tokenizer."""

    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def max_chars(self, n_tokens: int) -> int: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus BOS, EOS and PAD: a fixed vocabulary of 259 that needs no download."""

    name = "bytes-v1"
    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> np.ndarray:
        # (n_bytes,) int64; undecodable surrogates are replaced rather than raising mid-batch
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)

    def max_chars(self, n_tokens: int) -> int:
        # a character is at least one byte, so n_tokens characters give at least n_tokens tokens
        return n_tokens


class HashedWordTokenizer:
    """quadflow's budget tokens (quadflow.text.TOKEN_PATTERN, lower-cased) hashed into `buckets` ids
    with CRC-32 (stable across processes), plus BOS, EOS and PAD: more context per position than
    bytes, still no vocabulary file."""

    def __init__(self, buckets: int = 16384):
        if buckets < 2:
            raise ValueError(f"word buckets = {buckets!r}; must be >= 2")
        self.buckets = int(buckets)
        self.name = f"hashed-words-{self.buckets}-v1"
        self.vocab_size = self.buckets + 3
        self.bos_id, self.eos_id, self.pad_id = self.buckets, self.buckets + 1, self.buckets + 2

    def encode(self, text: str) -> np.ndarray:
        words = _WORD_RE.findall(text.lower())
        return np.fromiter((zlib.crc32(w.encode("utf-8", "replace")) % self.buckets for w in words), np.int64, len(words))

    def max_chars(self, n_tokens: int) -> int:
        return 64 * n_tokens  # words longer than 64 characters are rare enough to cut


def make_tokenizer(kind: str, buckets: int = 16384) -> Tokenizer:
    """'bytes' or 'hashed-words' (see the two classes above)."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hashed-words":
        return HashedWordTokenizer(buckets)
    raise ValueError(f"tokenizer = {kind!r}; use 'bytes' or 'hashed-words'")


def document_tokens(tokenizer: Tokenizer, text: str, max_tokens: int) -> np.ndarray:
    """[BOS, ...text..., EOS] cut to at most max_tokens + 1 ids (max_tokens targets)."""
    body = tokenizer.encode(text[: tokenizer.max_chars(max_tokens)])
    ids = np.concatenate([[tokenizer.bos_id], body, [tokenizer.eos_id]]).astype(np.int64)
    return ids[: max_tokens + 1]


@dataclass(frozen=True)
class Batch:
    """Chunks of whole documents, right-padded to one length; every document has the same number
    of chunks, stored in consecutive rows."""

    inputs: np.ndarray  # (R, L) int64 token ids, PAD after each chunk's end
    targets: np.ndarray  # (R, L) int64 next-token ids, IGNORE on padding
    weights: np.ndarray  # (R, L) float64: 1 / (document's target count) on real targets, else 0
    chunk_doc: np.ndarray  # (R,) int64 position of the chunk's document within `docs` (r // chunks)
    docs: np.ndarray  # (D,) int64 indices of the documents into the caller's list


def chunk_spans(n_ids: int, seq_len: int) -> list[tuple[int, int]]:
    """(start, stop) slices of a document's ids: inputs ids[start:stop-1], targets ids[start+1:stop]."""
    return [(s, min(s + seq_len + 1, n_ids)) for s in range(0, n_ids - 1, seq_len)]


def make_batches(
    docs: Sequence[np.ndarray],
    seq_len: int,
    pad_id: int,
    batch_tokens: int,
    max_batch_docs: int = 256,
) -> Iterator[Batch]:
    """Group whole documents (sorted by length) into padded batches of about batch_tokens tokens."""
    lengths = np.array([len(d) - 1 for d in docs], dtype=np.int64)  # targets per document
    if np.any(lengths < 1):
        raise ValueError(f"a document needs at least 2 ids (BOS, EOS); got lengths {lengths[lengths < 1][:5]}")
    order = np.argsort(-lengths, kind="stable")
    i = 0
    while i < len(order):
        width = min(int(lengths[order[i]]), seq_len)  # padded length of this batch (longest first)
        group, rows = [], 0
        per_doc = -(-int(lengths[order[i]]) // seq_len)  # chunks per document of this batch
        while i < len(order) and len(group) < max_batch_docs:
            n_chunks = -(-int(lengths[order[i]]) // seq_len)
            # one chunk count per batch, so per-document sums are a reshape, not a scatter
            if group and (n_chunks != per_doc or (rows + n_chunks) * width > batch_tokens):
                break
            group.append(int(order[i]))
            rows += n_chunks
            i += 1
        inputs = np.full((rows, width), pad_id, dtype=np.int64)
        targets = np.full((rows, width), IGNORE, dtype=np.int64)
        weights = np.zeros((rows, width), dtype=np.float64)
        chunk_doc = np.empty(rows, dtype=np.int64)
        r = 0
        for pos, d in enumerate(group):
            ids = docs[d]
            for start, stop in chunk_spans(len(ids), seq_len):
                n = stop - start - 1
                inputs[r, :n] = ids[start : stop - 1]
                targets[r, :n] = ids[start + 1 : stop]
                weights[r, :n] = 1.0 / lengths[d]
                chunk_doc[r] = pos
                r += 1
        yield Batch(inputs, targets, weights, chunk_doc, np.asarray(group, dtype=np.int64))
