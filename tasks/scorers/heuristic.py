"""Heuristic quality: the published Gopher, C4 and FineWeb document rules, vectorized.

Score = fraction of RULES a document passes, in [0, 1]; detail = comma-joined names of the
rules it fails ('' when it passes all). Rule names are stable identifiers: reports count them.

Definitions (whitespace tokenization, no language-specific tokenizer, so the rules run on any
script; thresholds are the published ones, each with its source below):
- words: runs of non-whitespace; a word's length counts its characters (punctuation included);
- lines: '\\n'-separated, stripped, empty ones dropped; paragraphs: separated by blank lines;
- duplicate fractions count every repeat after an element's first occurrence; character
  fractions are over the document's characters;
- top n-gram fraction: characters covered by the most frequent word n-gram (count x length,
  joined with single spaces) over the document's characters; only n-grams that repeat count.

Like their sources, the rules assume English-like text (stop words, space-separated words):
other languages, and scripts written without spaces, fail some of them by construction.

Sources: Rae et al. 2021 (Gopher/MassiveText, arXiv:2112.11446, App. A, Table A1); Raffel
et al. 2020 (C4, arXiv:1910.10683, Sec. 2.2); Penedo et al. 2024 (FineWeb, arXiv:2406.17557,
Sec. 3.3) and datatrove's FineWebQualityFilter, which publishes the list-ratio threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from quadflow.log import Progress
from quadflow.tasks.scorers import ScoreInput, Scorer, Scores, register

VERSION = "heuristic-1"

# Gopher's stop words (App. A): a document must hold at least two occurrences of these.
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")

_STOP_RE = r"(?i)\b(?:" + "|".join(STOP_WORDS) + r")\b"
_WORD_RE = r"\S+"
_ELLIPSIS_RE = r"\.\.\.|…"
# Bullet glyphs, or '-'/'*' followed by a space (so man-page options like '-v' are not bullets).
_BULLET_RE = r"^(?:[•‣◦●▪∙·]|[-*] )"
_ELLIPSIS_END_RE = r"(?:\.\.\.|…)$"
# Terminal punctuation (C4: period, exclamation, question mark, end quote) plus CJK/Arabic/Hindi stops.
_PUNCT_END_RE = r"[.!?\"'”’»…。！？؟۔।]$"
_SENTENCE_RE = r"[.!?。！？؟।]+(?:\s|$)"
_PARA_BREAK_RE = r"\n[^\S\n]*\n\s*"
_PARA_SEP = "\x00"  # paragraph breaks become NUL, then split on it (a NUL in a text also splits)
SHORT_LINE_CHARS = 30  # FineWeb: a line of <= 30 characters is "short"


@dataclass(frozen=True)
class Rule:
    """A document passes when min <= stat <= max (a None bound is not checked)."""

    name: str
    stat: str
    min: float | None = None
    max: float | None = None
    source: str = ""

    def passes(self) -> pl.Expr:
        cond = pl.lit(True)
        if self.min is not None:
            cond = cond & (pl.col(self.stat) >= self.min)
        if self.max is not None:
            cond = cond & (pl.col(self.stat) <= self.max)
        return cond.alias(self.name)


RULES: tuple[Rule, ...] = (
    Rule("gopher_word_count", "n_words", 50, 100_000, "Gopher App. A: between 50 and 100,000 words"),
    Rule("gopher_mean_word_length", "mean_word_length", 3, 10, "Gopher App. A: mean word length 3 to 10 chars"),
    Rule("gopher_hash_ratio", "hash_per_word", None, 0.1, "Gopher App. A: '#'-to-word ratio <= 0.1"),
    Rule("gopher_ellipsis_ratio", "ellipsis_per_word", None, 0.1, "Gopher App. A: ellipsis-to-word ratio <= 0.1"),
    Rule("gopher_bullet_lines", "bullet_line_frac", None, 0.9, "Gopher App. A: <= 90% of lines start with a bullet"),
    Rule("gopher_ellipsis_lines", "ellipsis_line_frac", None, 0.3, "Gopher App. A: <= 30% of lines end in an ellipsis"),
    Rule("gopher_alpha_words", "alpha_word_frac", 0.8, None, "Gopher App. A: >= 80% of words hold a letter"),
    Rule("gopher_stop_words", "stop_words", 2, None, "Gopher App. A: >= 2 of the, be, to, of, and, that, have, with"),
    Rule("gopher_dup_lines", "dup_line_frac", None, 0.3, "Gopher Table A1: duplicate line fraction 0.30"),
    Rule("gopher_dup_line_chars", "dup_line_char_frac", None, 0.2,
         "Gopher Table A1: duplicate line character fraction 0.20"),
    Rule("gopher_dup_paragraphs", "dup_para_frac", None, 0.3, "Gopher Table A1: duplicate paragraph fraction 0.30"),
    Rule("gopher_dup_paragraph_chars", "dup_para_char_frac", None, 0.2,
         "Gopher Table A1: duplicate paragraph character fraction 0.20"),
    Rule("gopher_top_2gram", "top_2gram_char_frac", None, 0.20, "Gopher Table A1: top 2-gram character fraction 0.20"),
    Rule("gopher_top_3gram", "top_3gram_char_frac", None, 0.18, "Gopher Table A1: top 3-gram character fraction 0.18"),
    Rule("gopher_top_4gram", "top_4gram_char_frac", None, 0.16, "Gopher Table A1: top 4-gram character fraction 0.16"),
    Rule("c4_lorem_ipsum", "lorem_ipsum", None, 0, "C4 Sec. 2.2: pages with 'lorem ipsum' removed"),
    Rule("c4_curly_bracket", "curly_brackets", None, 0, "C4 Sec. 2.2: pages with a curly bracket removed"),
    Rule("c4_min_sentences", "sentences", 3, None, "C4 Sec. 2.2: pages with fewer than 3 sentences removed"),
    Rule("fineweb_line_punct", "line_punct_frac", 0.12, None, "FineWeb Sec. 3.3: >= 12% of lines end in punctuation"),
    Rule("fineweb_short_lines", "short_line_frac", None, 0.67, "FineWeb Sec. 3.3: <= 67% of lines have <= 30 chars"),
    Rule("fineweb_list_ratio", "newline_per_word", None, 0.3, "datatrove FineWebQualityFilter: new_line_ratio 0.3"),
)


def _nonempty_parts(text: pl.Expr, sep: str) -> pl.Expr:
    """Split on a literal separator, strip each part, drop the empty ones: list[str] per doc."""
    return text.str.split(sep).list.eval(pl.element().str.strip_chars().pipe(lambda e: e.filter(e != "")))


def _dup_stats(parts: str) -> list[pl.Expr]:
    """Repeated elements (after the first occurrence) and their characters, per document."""
    col = pl.col(parts)
    chars = col.list.eval(pl.element().str.len_chars()).list.sum()
    unique_chars = col.list.unique().list.eval(pl.element().str.len_chars()).list.sum()
    return [
        (col.list.len() - col.list.n_unique()).alias(f"{parts}_dup"),
        (chars - unique_chars).alias(f"{parts}_dup_chars"),
    ]


def _top_ngram_chars(flat: pl.DataFrame, n_docs: int, n: int) -> np.ndarray:
    """Characters covered by each document's most frequent repeated word n-gram: (n_docs,) int64."""
    # flat: one row per word in document order, columns doc (u32), h (u64 word hash), n (u32 chars)
    grams = (
        flat.lazy()
        .with_columns(
            # the key hashes the document too, so equal n-grams of different documents differ
            g=pl.struct(pl.col("doc"), *[pl.col("h").shift(-i).alias(f"h{i}") for i in range(n)]).hash(seed=n),
            glen=pl.sum_horizontal([pl.col("n").shift(-i) for i in range(n)]) + (n - 1),
            whole=pl.col("doc").shift(-(n - 1)) == pl.col("doc"),  # the n words lie in one document
        )
        .filter(pl.col("whole"))
        .select("doc", "g", "glen")
        .collect()
    )  # (n-grams, 3)
    # A sort finds the repeated keys at half the cost of a full group_by; only the (few) repeated
    # n-grams are then grouped. (numpy, not polars' rle: polars 2.1's streaming rle panics on
    # some multi-chunk inputs.)
    keys = np.sort(grams["g"].to_numpy())  # (n-grams,) u64
    repeated = np.unique(keys[1:][keys[1:] == keys[:-1]])  # keys seen at least twice
    top = (
        grams.lazy()
        .filter(pl.col("g").is_in(pl.Series(repeated, dtype=pl.UInt64).implode()))
        .group_by("g")
        .agg(doc=pl.col("doc").first(), count=pl.len(), glen=pl.col("glen").first())
        .group_by("doc")
        .agg(top=(pl.col("count") * pl.col("glen")).sort_by(["count", "glen"], descending=True).first())
        .collect()
    )
    out = np.zeros(n_docs, dtype=np.int64)
    out[top["doc"].to_numpy()] = top["top"].to_numpy()
    return out


def text_stats(texts: pl.Series) -> pl.DataFrame:
    """Every statistic a rule reads, one row per text (nulls count as empty texts)."""
    n_docs = texts.len()
    frame = pl.DataFrame({"text": texts.cast(pl.String).fill_null("")})
    text = pl.col("text")
    doc = (
        frame.lazy()
        .with_columns(
            lines=_nonempty_parts(text, "\n"),
            paras=_nonempty_parts(text.str.replace_all(_PARA_BREAK_RE, _PARA_SEP), _PARA_SEP),
        )
        .select(
            n_chars=text.str.len_chars(),
            hashes=text.str.count_matches("#", literal=True),
            ellipses=text.str.count_matches(_ELLIPSIS_RE),
            newlines=text.str.count_matches("\n", literal=True),
            stop_words=text.str.count_matches(_STOP_RE),
            sentences=text.str.count_matches(_SENTENCE_RE),
            lorem_ipsum=text.str.contains(r"(?i)lorem ipsum").cast(pl.Int32),
            curly_brackets=text.str.count_matches("{", literal=True),
            n_lines=pl.col("lines").list.len(),
            bullet_lines=pl.col("lines").list.eval(pl.element().str.contains(_BULLET_RE)).list.sum(),
            ellipsis_lines=pl.col("lines").list.eval(pl.element().str.contains(_ELLIPSIS_END_RE)).list.sum(),
            punct_lines=pl.col("lines").list.eval(pl.element().str.contains(_PUNCT_END_RE)).list.sum(),
            short_lines=pl.col("lines").list.eval(pl.element().str.len_chars() <= SHORT_LINE_CHARS).list.sum(),
            n_paras=pl.col("paras").list.len(),
            *_dup_stats("lines"),
            *_dup_stats("paras"),
        )
        .collect()
    )

    words = (
        frame.select(w=text.str.extract_all(_WORD_RE))
        .with_row_index("doc")
        .explode("w")
        .drop_nulls("w")
        .select(
            pl.col("doc"),
            h=pl.col("w").hash(seed=0),
            n=pl.col("w").str.len_chars(),
            alpha=pl.col("w").str.contains(r"\p{L}"),
        )
    )  # (total words, 4), in document order
    d = words["doc"].to_numpy()
    n_words = np.bincount(d, minlength=n_docs)
    word_chars = np.bincount(d, weights=words["n"].to_numpy(), minlength=n_docs)
    alpha_words = np.bincount(d, weights=words["alpha"].to_numpy(), minlength=n_docs)
    top = {k: _top_ngram_chars(words, n_docs, k) for k in (2, 3, 4)}

    per_word = np.maximum(n_words, 1)
    chars = np.maximum(doc["n_chars"].to_numpy(), 1)
    lines = np.maximum(doc["n_lines"].to_numpy(), 1)
    paras = np.maximum(doc["n_paras"].to_numpy(), 1)
    return doc.with_columns(
        n_words=pl.Series(n_words, dtype=pl.Int64),
        mean_word_length=pl.Series(word_chars / per_word),
        hash_per_word=doc["hashes"].to_numpy() / per_word,
        ellipsis_per_word=doc["ellipses"].to_numpy() / per_word,
        newline_per_word=doc["newlines"].to_numpy() / per_word,
        alpha_word_frac=pl.Series(alpha_words / per_word),
        bullet_line_frac=doc["bullet_lines"].to_numpy() / lines,
        ellipsis_line_frac=doc["ellipsis_lines"].to_numpy() / lines,
        line_punct_frac=doc["punct_lines"].to_numpy() / lines,
        short_line_frac=doc["short_lines"].to_numpy() / lines,
        dup_line_frac=doc["lines_dup"].to_numpy() / lines,
        dup_line_char_frac=doc["lines_dup_chars"].to_numpy() / chars,
        dup_para_frac=doc["paras_dup"].to_numpy() / paras,
        dup_para_char_frac=doc["paras_dup_chars"].to_numpy() / chars,
        **{f"top_{k}gram_char_frac": top[k] / chars for k in (2, 3, 4)},
    )


def apply_rules(stats: pl.DataFrame, rules: tuple[Rule, ...] = RULES) -> pl.DataFrame:
    """score (fraction of rules passed) and detail (failed rule names, comma-joined) per row."""
    if not rules:
        raise ValueError("apply_rules needs at least one rule")
    passed = stats.select([r.passes() for r in rules])
    return passed.select(
        score=pl.sum_horizontal([pl.col(r.name).cast(pl.Int32) for r in rules]) / len(rules),
        detail=pl.concat_str(
            [pl.when(~pl.col(r.name)).then(pl.lit(r.name)) for r in rules], separator=",", ignore_nulls=True
        ).fill_null(""),
    )


def heuristic_scores(texts: pl.Series, rules: tuple[Rule, ...] = RULES) -> pl.DataFrame:
    """score and detail for each text (one batch; see HeuristicScorer for the batched run)."""
    return apply_rules(text_stats(texts), rules)


def _batches(texts: pl.Series, batch_chars: int) -> list[tuple[int, int]]:
    """[start, end) row ranges holding about batch_chars characters each (at least one row)."""
    ends = np.cumsum(texts.str.len_bytes().fill_null(0).to_numpy(), dtype=np.int64)
    bounds, start = [], 0
    while start < texts.len():
        end = int(np.searchsorted(ends, (ends[start - 1] if start else 0) + batch_chars, side="right"))
        end = max(end, start + 1)
        bounds.append((start, end))
        start = end
    return bounds


@register
class HeuristicScorer(Scorer):
    """Gopher/C4/FineWeb rules: no model, no target set; explains every low score by name."""

    name = "heuristic"
    VERSION = VERSION
    needs = frozenset({"texts"})

    def __init__(self, random_state: int = 0, batch_chars: int = 1 << 22):
        super().__init__(random_state=random_state)
        # UTF-8 bytes per vectorized batch: bounds memory (~250 MB per 4 MB of text, measured on
        # the Debian pool); larger batches were no faster.
        self.batch_chars = batch_chars

    @classmethod
    def merge_params(cls, parts: list[dict]) -> dict:
        """The rules, and how many pool documents fail each: the shards' counts summed."""
        if not parts:
            return {}
        failed = {r.name: sum(int(p["failed"].get(r.name, 0)) for p in parts) for r in RULES}
        return {**parts[0], "failed": failed}

    def apply(self, data: ScoreInput) -> Scores:
        texts = data.require("texts", self.name)
        progress = Progress("score heuristic", texts.len())
        parts = []
        for start, end in _batches(texts, self.batch_chars):
            parts.append(heuristic_scores(texts.slice(start, end - start)))
            progress.update(end - start)
        progress.close()
        out = pl.concat(parts) if parts else pl.DataFrame(schema={"score": pl.Float64, "detail": pl.String})
        return Scores(
            score=out["score"].to_numpy().astype(np.float64),
            detail=out["detail"],
            params={
                "rules": {r.name: {"stat": r.stat, "min": r.min, "max": r.max, "source": r.source} for r in RULES},
                "failed": _failure_counts(out["detail"]),
            },
        )


def _failure_counts(detail: pl.Series) -> dict[str, int]:
    """How many documents fail each rule (reasons are data: reports count them)."""
    names = detail.str.split(",").explode()
    counts = names.filter(names != "").value_counts()
    found = dict(zip(counts[names.name].to_list(), counts["count"].to_list()))
    return {r.name: int(found.get(r.name, 0)) for r in RULES}
