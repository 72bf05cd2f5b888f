"""Text conventions shared by every stage: normalization, document ids and token counts.

Tokenizer: quadflow counts tokens as runs of word characters and single punctuation marks,
the regex TOKEN_PATTERN below (Unicode-aware, so it works for any script with word
boundaries). It needs no download and is what the budget is measured in; it is documented
in the README so users can convert to their model's tokenizer.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import polars as pl

TOKEN_PATTERN = r"\w+|[^\w\s]"
_TOKEN_RE = re.compile(TOKEN_PATTERN)
_WS_RE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Canonical form for exact dedup: NFKC, lower case, whitespace runs collapsed, trimmed."""
    return _WS_RE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def content_hash(text: str) -> str:
    """Stable document id: 16 hex digits of BLAKE2b over the normalized text."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=8).hexdigest()


def count_tokens(text: str) -> int:
    return sum(1 for _ in _TOKEN_RE.finditer(text))


def count_tokens_expr(col: str = "text") -> pl.Expr:
    """Vectorized token count over a polars string column (same rule as count_tokens)."""
    return pl.col(col).str.count_matches(TOKEN_PATTERN).cast(pl.Int64)
