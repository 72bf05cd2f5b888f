"""Generate a large pool (millions of documents) from a real one, to run quadflow at scale.

    python benchmarks/make_scale_pool.py ../shared/data/debian-pool-v1.jsonl.zst runs/scale-5m --docs 5000000
    python benchmarks/make_scale_pool.py SOURCE OUT_DIR --docs N [--docs-per-file 500000] [--seed 0]
        [--dup-rate 0.05] [--near-dup-rate 0.10] [--workers 1]

Every output document is derived from source documents, so the pool keeps the source's domains
and length distribution, and it is perturbed so that it is not an exact copy:

- `perturbed` (the rest): a source document drawn uniformly, sometimes concatenated with another
  of its domain or truncated at a space, then some lines swapped, digits changed, a few words'
  case changed, one word replaced by a word of another document of its domain, and 2-5% of its
  words (at least one) dropped, duplicated or swapped with the next word;
- `exact duplicate` (--dup-rate): the text of an earlier output document, unchanged;
- `near duplicate` (--near-dup-rate): an earlier output document with one edit (a word replaced
  by a word of another document of its domain, or a digit changed).

Every edit is chosen to survive quadflow's normalization (NFKC, lower case, collapsed
whitespace), so exact dedup finds the intended duplicates; two perturbations of one very short
source can still collide by chance (27 of 200,000 documents from the Debian pool), and those
are not counted as duplicates.

Documents are a pure function of (seed, position): every random draw for document g is a
splitmix64 hash of (the seed's SeedSequence state, g, stream), so any part file can be generated
alone, a duplicate can copy any earlier document in any file by recomputing it, and a pool of
N documents is the first N documents of a larger one with the same seed and source.

With --truth FILE it also writes the planted duplicates as a Parquet side file (`ground_truth`):
one row per position with its kind, the earlier position it copies, its perturbed root and that
root's source document, the ground truth dedup benchmarks score against (benchmarks/dedup.py).

Output: OUT_DIR/part-00000.jsonl.zst, ... (zstd level 3, --docs-per-file documents each; fields
id, source, domain, lang, title, text) and OUT_DIR/MANIFEST.json (arguments, source size and
sha256, per-file sha256 and counts, totals). Each part is written to a hidden temp name and
renamed when complete, and the manifest is rewritten (atomically) after each part, so a killed
run leaves no complete-looking half file; rerunning the same command verifies the parts the
manifest lists (sha256) and generates only the rest. Memory: the source once (~2x its text
size) plus one batch; it does not grow with N.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from json.encoder import encode_basestring as _json_str  # json.dumps(s, ensure_ascii=False), minus its overhead
from pathlib import Path

import numpy as np
import zstandard

from quadflow.text import normalize

VERSION = "scale-pool-1"
MANIFEST = "MANIFEST.json"
ZSTD_LEVEL = 3
BATCH_DOCS = 8192  # documents rendered, encoded and compressed at a time
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Document kinds.
PERTURBED, EXACT_DUP, NEAR_DUP = 0, 1, 2
# Shapes of a perturbed document. Truncation keeps 30-90% (mean 60%) of a text of >= 200 chars
# (those hold nearly all characters), so it removes about 0.08 * 0.4 = 3.2% of the expected length
# and concatenation adds 3%: the mean length stays that of the source (within 1-4% on the Debian pool).
P_CONCAT, P_TRUNCATE = 0.03, 0.08
PLAIN, CONCAT, TRUNCATE = 0, 1, 2
TRUNCATE_MIN_CHARS = 200  # shorter texts (dictionary entries, quotes) are kept whole: a cut one is a word or two
# Per perturbed document: probabilities of the optional edits, and the range of the word-edit rate.
P_REORDER, P_DIGITS, P_CASE = 0.25, 0.25, 0.30
WORD_EDIT_RATE = (0.02, 0.05)  # fraction of words dropped, duplicated or swapped
P_NEAR_DIGIT = 0.2  # a near duplicate's one edit is a digit change this often (if it has digits)

# Bits of a perturbed document's `ops`, counted in the manifest.
OP_BITS = {"concatenated": 1, "truncated": 2, "lines_reordered": 4, "digits_changed": 8, "case_changed": 16}
COUNT_KEYS = ("documents", "perturbed", "exact_duplicates", "near_duplicates",
              "duplicates_of_earlier_files", *OP_BITS, "chars")

# splitmix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_STREAMS = np.uint64(8)  # plan draws per document: kind, target, source, shape, partner, seed
HEAD_DRAWS = 16  # uniforms pre-drawn per perturbed document (vectorized); enough for most short documents
_DIGIT_RE = re.compile(r"[0-9]")
_WORD_RE = re.compile(r"\S+")
_CASES = (str.upper, str.capitalize, str.lower)


class ScalePoolError(ValueError):
    """Bad arguments or an output directory that holds a different pool."""


@dataclass(frozen=True)
class ScaleSpec:
    """What to generate; with the source's sha256 it determines every output byte."""

    docs: int
    docs_per_file: int = 500_000
    seed: int = 0
    dup_rate: float = 0.05
    near_dup_rate: float = 0.10

    def __post_init__(self) -> None:
        if self.docs < 1:
            raise ScalePoolError(f"--docs must be >= 1, got {self.docs}")
        if self.docs_per_file < 1:
            raise ScalePoolError(f"--docs-per-file must be >= 1, got {self.docs_per_file}")
        if self.seed < 0:
            raise ScalePoolError(f"--seed must be >= 0, got {self.seed}")
        for name in ("dup_rate", "near_dup_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ScalePoolError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.dup_rate + self.near_dup_rate > 1.0:
            raise ScalePoolError(f"--dup-rate + --near-dup-rate must be <= 1, got {self.dup_rate + self.near_dup_rate}")

    @property
    def n_files(self) -> int:
        return -(-self.docs // self.docs_per_file)

    def file_range(self, k: int) -> tuple[int, int]:
        """Global positions [start, stop) of part k."""
        start = k * self.docs_per_file
        return start, min(start + self.docs_per_file, self.docs)


def part_name(k: int) -> str:
    return f"part-{k:05d}.jsonl.zst"


def _temp_path(path: Path) -> Path:
    """Hidden, so `part-*.jsonl.zst` globs never see a half-written part."""
    return path.with_name(f".{path.name}.tmp")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Source


@dataclass(frozen=True)
class SourcePool:
    """The source documents held once: texts, their JSON metadata fragments, and domain groups."""

    texts: list[str]  # (n,)
    meta: list[str]  # (n,) '"source":..,"domain":..,"lang":..,"title":..' ready to splice into a line
    domain: np.ndarray  # (n,) int32 domain code
    by_domain: np.ndarray  # (n,) int64 document indices grouped by domain code
    domain_start: np.ndarray  # (n_domains,) int64 offset of each domain's group in by_domain
    domain_count: np.ndarray  # (n_domains,) int64 size of each group
    skipped: int  # source lines without a usable text

    def __len__(self) -> int:
        return len(self.texts)


def _open_lines(raw: io.BufferedReader) -> Iterator[str]:
    head = raw.peek(4)[:4]
    stream = zstandard.ZstdDecompressor().stream_reader(raw) if head == _ZSTD_MAGIC else raw
    return io.TextIOWrapper(stream, encoding="utf-8")


def load_source(path: str | Path) -> SourcePool:
    """Read a jsonl or jsonl.zst file of {"text", ...} records (streamed; only the fields kept)."""
    path = Path(path)
    texts: list[str] = []
    meta: list[str] = []
    codes: list[int] = []
    domains: dict[str, int] = {}
    skipped = 0
    dumps = json.dumps
    with open(path, "rb") as raw:
        for line in _open_lines(raw):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            text = rec.get("text") if isinstance(rec, dict) else None
            if not isinstance(text, str) or not text.strip():
                skipped += 1
                continue
            source = str(rec.get("source") or "unknown")
            domain = str(rec.get("domain") or source)
            lang = str(rec.get("lang") or "und")
            title = str(rec.get("title") or "")
            texts.append(text)
            meta.append(f'"source":{dumps(source, ensure_ascii=False)},"domain":{dumps(domain, ensure_ascii=False)},'
                        f'"lang":{dumps(lang, ensure_ascii=False)},"title":{dumps(title, ensure_ascii=False)}')
            codes.append(domains.setdefault(domain, len(domains)))
    if not texts:
        raise ScalePoolError(f"no documents with a non-empty 'text' in {str(path)!r}")
    domain = np.asarray(codes, dtype=np.int32)
    count = np.bincount(domain, minlength=len(domains)).astype(np.int64)
    return SourcePool(texts=texts, meta=meta, domain=domain,
                      by_domain=np.argsort(domain, kind="stable").astype(np.int64),
                      domain_start=np.cumsum(count) - count, domain_count=count, skipped=skipped)


# ---------------------------------------------------------------------------------------------
# Plan: every random draw of a document, as a hash of (seed, position, stream)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer; uint64 arithmetic wraps."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


class DocumentPlanner:
    """Draws each output document's kind, target, source, shape and edit seed from its position."""

    def __init__(self, pool: SourcePool, spec: ScaleSpec):
        self.pool = pool
        self.spec = spec
        self._plan_key, self._edit_key = np.random.SeedSequence(spec.seed).generate_state(2, np.uint64)

    def _bits(self, g: np.ndarray, stream: int) -> np.ndarray:
        return _mix64(self._plan_key + (g.astype(np.uint64) * _STREAMS + np.uint64(stream)) * _GOLDEN)

    def _uniform(self, g: np.ndarray, stream: int) -> np.ndarray:
        return (self._bits(g, stream) >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)

    def head_uniforms(self, g: np.ndarray) -> np.ndarray:
        """(n, HEAD_DRAWS) uniforms in [0, 1) for the text edits of positions g, (n,) int64."""
        g = np.asarray(g, dtype=np.int64).astype(np.uint64)
        counter = g[:, None] * np.uint64(HEAD_DRAWS) + np.arange(HEAD_DRAWS, dtype=np.uint64)  # (n, HEAD_DRAWS)
        bits = _mix64(self._edit_key + counter * _GOLDEN)
        return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def plan(self, g: np.ndarray) -> dict[str, np.ndarray]:
        """Draws for positions g, (n,) int64; every array is (n,)."""
        g = np.asarray(g, dtype=np.int64)
        spec, pool = self.spec, self.pool
        u = self._uniform(g, 0)
        kind = np.where(u < spec.dup_rate, EXACT_DUP,
                        np.where(u < spec.dup_rate + spec.near_dup_rate, NEAR_DUP, PERTURBED)).astype(np.int8)
        kind[g == 0] = PERTURBED  # nothing earlier to copy
        target = (self._uniform(g, 1) * g).astype(np.int64)  # uniform over earlier positions, < g
        src = np.minimum((self._uniform(g, 2) * len(pool)).astype(np.int64), len(pool) - 1)
        u = self._uniform(g, 3)
        shape = np.where(u < P_CONCAT, CONCAT, np.where(u < P_CONCAT + P_TRUNCATE, TRUNCATE, PLAIN)).astype(np.int8)
        dom = pool.domain[src]
        offset = np.minimum((self._uniform(g, 4) * pool.domain_count[dom]).astype(np.int64), pool.domain_count[dom] - 1)
        partner = pool.by_domain[pool.domain_start[dom] + offset]  # another document of src's domain
        return {"kind": kind, "target": target, "src": src, "shape": shape, "partner": partner,
                "seed": self._bits(g, 5)}

    def resolve(self, g: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, list[list[int]]]:
        """Follow duplicates back to a perturbed root: (plan of g, root positions, near-dup seeds innermost first)."""
        g = np.asarray(g, dtype=np.int64)
        p = self.plan(g)
        root = g.copy()
        chains: list[list[int]] = [[] for _ in range(len(g))]  # outermost edit first while collecting
        near = np.flatnonzero(p["kind"] == NEAR_DUP)
        for i, s in zip(near.tolist(), p["seed"][near].tolist()):
            chains[i].append(s)
        active = np.flatnonzero(p["kind"] != PERTURBED)
        cur = p["target"][active]
        while active.size:  # each step moves to a strictly earlier position, so this ends
            root[active] = cur
            q = self.plan(cur)
            near = q["kind"] == NEAR_DUP
            for i, s in zip(active[near].tolist(), q["seed"][near].tolist()):
                chains[i].append(s)
            more = q["kind"] != PERTURBED
            active, cur = active[more], q["target"][more]
        for chain in chains:
            chain.reverse()
        return p, root, chains


# ---------------------------------------------------------------------------------------------
# Text edits (pure: text and a source of uniform floats in, text out)

Uniform = Callable[[], float]  # returns a float in [0, 1) per call


def uniform_stream(head: list[float], seed: int) -> Uniform:
    """head's floats, then random.Random(seed)'s: most documents never pay for seeding a Mersenne Twister."""
    return _uniforms(head, seed).__next__


def _uniforms(head: list[float], seed: int) -> Iterator[float]:
    yield from head
    draw = random.Random(seed).random
    while True:
        yield draw()


def edit_words(text: str, rnd: Uniform, n_edits: int, n_case: int = 0, donor: str = "") -> str:
    """Drop, duplicate or swap-with-next about n_edits space-separated words; change the case of n_case words.

    Edits skip blank tokens and swaps of words equal after quadflow's normalization; if none
    lands on a word, the first word is duplicated. So the result differs from `text` after
    normalization unless edits cancel out (a drop and a duplicate of equal neighbours: rare).
    With a donor text, one word of the result is then replaced by a word drawn from it, so that a
    short source copied many times rarely yields the same text twice.
    """
    words = text.split(" ")
    n = len(words)
    for _ in range(n_case):
        p = int(rnd() * n)
        words[p] = _CASES[int(rnd() * 3)](words[p])
    if n_edits <= 1:
        positions = (int(rnd() * n),)
    else:  # distinct positions; a collision just means one edit fewer
        positions = sorted({int(rnd() * n) for _ in range(min(n_edits, n))})
    out: list[str] = []
    prev = 0
    for p in positions:
        w = words[p]
        if p < prev or not w or w.isspace():
            continue
        out += words[prev:p]
        op = rnd()
        if op < 1 / 3 and n > 1:  # drop
            prev = p + 1
            continue
        if op >= 2 / 3 and p + 1 < n:  # swap with the next word, unless that changes nothing
            nxt = words[p + 1]
            if (nn := normalize(nxt)) and nn != normalize(w):
                out += (nxt, w)
                prev = p + 2
                continue
        out += (w, w)  # duplicate
        prev = p + 1
    out += words[prev:]
    if prev == 0 or all(not w or w.isspace() for w in out):  # no edit landed on a word, or only blanks left
        first = next((i for i, w in enumerate(words) if w and not w.isspace()), None)
        if first is None:  # a blank text has no word to edit
            return text
        out = [*words[:first], words[first], *words[first:]]
    if donor and (new := random_word(donor, rnd)):
        out[int(rnd() * len(out))] = new
    return " ".join(out)


def random_word(text: str, rnd: Uniform, max_chars: int = 40) -> str:
    """A whitespace-delimited word of text at a random offset (cut to max_chars)."""
    i = int(rnd() * len(text))
    m = _WORD_RE.search(text, i)
    if m is not None and m.start() == i and i > 0 and not text[i - 1].isspace():  # inside a word: take the next
        m = _WORD_RE.search(text, m.end())
    m = m or _WORD_RE.search(text)  # past the last word: take the first
    return m.group()[:max_chars] if m else ""


def change_digits(text: str, rnd: Uniform, n: int) -> tuple[str, bool]:
    """Replace up to n ASCII digits (the first at or after random offsets) by a different digit."""
    changed = False
    for _ in range(n):
        m = _DIGIT_RE.search(text, int(rnd() * len(text))) or _DIGIT_RE.search(text)
        if m is None:
            break
        i = m.start()
        text = f"{text[:i]}{(int(text[i]) + 1 + int(rnd() * 9)) % 10}{text[i + 1:]}"
        changed = True
    return text, changed


def reorder_lines(text: str, rnd: Uniform) -> str:
    """Swap about 5% of the lines (at least one pair) of a multi-line document."""
    lines = text.split("\n")
    n = len(lines)
    if n < 3:
        return text
    for _ in range(max(1, n // 20)):
        i, j = int(rnd() * n), int(rnd() * n)
        lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def perturb(text: str, partner: str, shape: int, rnd: Uniform) -> tuple[str, int]:
    """A perturbed copy of `text` (concatenated with `partner` or truncated per `shape`); returns (text, OP_BITS)."""
    ops = 0
    if shape == CONCAT:
        text = f"{text}\n\n{partner}"
        ops |= OP_BITS["concatenated"]
    elif shape == TRUNCATE and len(text) >= TRUNCATE_MIN_CHARS:
        cut = text.rfind(" ", 0, int(len(text) * (0.3 + 0.6 * rnd())))
        if cut > 0:
            text = text[:cut]
            ops |= OP_BITS["truncated"]
    if rnd() < P_REORDER and "\n" in text:
        reordered = reorder_lines(text, rnd)
        if reordered != text:
            text = reordered
            ops |= OP_BITS["lines_reordered"]
    if rnd() < P_DIGITS:
        text, changed = change_digits(text, rnd, 1 + int(rnd() * 3))
        ops |= OP_BITS["digits_changed"] if changed else 0
    n_case = 1 + int(rnd() * 3) if rnd() < P_CASE else 0
    ops |= OP_BITS["case_changed"] if n_case else 0
    rate = WORD_EDIT_RATE[0] + (WORD_EDIT_RATE[1] - WORD_EDIT_RATE[0]) * rnd()
    n_words = text.count(" ") + 1
    n_edits = int(rate * n_words + rnd())  # stochastic rounding; edit_words does at least one
    return edit_words(text, rnd, n_edits, n_case, donor=partner), ops


def near_edit(text: str, rnd: Uniform, donor: str) -> str:
    """One edit: a digit changed, or a word replaced by one of donor's.

    Near duplicates of one document must not collide: a drop, duplicate or swap has about three
    outcomes per word, a replacement one per word and donor word. A replacement that changes
    nothing after normalization falls back to a word dropped, duplicated or swapped.
    """
    if rnd() < P_NEAR_DIGIT:
        edited, changed = change_digits(text, rnd, 1)
        if changed:
            return edited
    words = text.split(" ")
    p = int(rnd() * len(words))
    new = random_word(donor, rnd)
    if new and normalize(new) != normalize(words[p]):
        words[p] = new
        return " ".join(words)
    return edit_words(text, rnd, 1)


# ---------------------------------------------------------------------------------------------
# Rendering and writing parts


def render(planner: DocumentPlanner, start: int, stop: int, counts: Counter, file_start: int = 0) -> list[str]:
    """JSON lines for positions [start, stop) of a part starting at file_start; adds kinds, edits and chars to counts."""
    pool = planner.pool
    texts, meta = pool.texts, pool.meta
    g = np.arange(start, stop, dtype=np.int64)
    p, root, chains = planner.resolve(g)
    r = planner.plan(root)
    kind = p["kind"].tolist()
    head = planner.head_uniforms(root).tolist()
    counts["exact_duplicates"] += int((p["kind"] == EXACT_DUP).sum())
    counts["near_duplicates"] += int((p["kind"] == NEAR_DUP).sum())
    counts["duplicates_of_earlier_files"] += int(((p["kind"] != PERTURBED) & (p["target"] < file_start)).sum())
    prefix = f'{{"id":"scale{planner.spec.seed}-'
    ops_seen: Counter = Counter()
    lines = []
    chars = 0
    for i, (pos, src, partner, shape, seed) in enumerate(
            zip(g.tolist(), r["src"].tolist(), r["partner"].tolist(), r["shape"].tolist(), r["seed"].tolist())):
        text, ops = perturb(texts[src], texts[partner], shape, uniform_stream(head[i], seed))
        if kind[i] == PERTURBED:
            ops_seen[ops] += 1
        for s in chains[i]:
            text = near_edit(text, random.Random(s).random, texts[partner])
        chars += len(text)
        lines.append(f'{prefix}{pos:010d}",{meta[src]},"text":{_json_str(text)}}}')
    counts["documents"] += stop - start
    counts["perturbed"] += sum(ops_seen.values())
    counts["chars"] += chars
    for name, bit in OP_BITS.items():
        counts[name] += sum(c for ops, c in ops_seen.items() if ops & bit)
    return lines


class _HashingWriter:
    """A file wrapper that hashes the (compressed) bytes as they are written."""

    def __init__(self, fh):
        self.fh, self.sha256, self.bytes = fh, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha256.update(b)
        self.bytes += len(b)
        return self.fh.write(b)

    def flush(self) -> None:
        self.fh.flush()


def write_part(pool: SourcePool, spec: ScaleSpec, k: int, out_dir: str | Path) -> dict:
    """Write part k to a temp name, then rename it; returns its manifest entry."""
    out_dir = Path(out_dir)
    path = out_dir / part_name(k)
    tmp = _temp_path(path)
    start, stop = spec.file_range(k)
    planner = DocumentPlanner(pool, spec)
    counts: Counter = Counter({key: 0 for key in COUNT_KEYS})
    with open(tmp, "wb") as fh:
        sink = _HashingWriter(fh)
        with zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(sink, closefd=False) as zw:
            for a in range(start, stop, BATCH_DOCS):
                lines = render(planner, a, min(a + BATCH_DOCS, stop), counts, start)
                lines.append("")
                zw.write("\n".join(lines).encode("utf-8", "replace"))  # "replace": lone surrogates in a source
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return {"name": path.name, "index": k, "first_doc": start, "docs": stop - start, "bytes": sink.bytes,
            "sha256": sink.sha256.hexdigest(), "counts": dict(counts)}


# ---------------------------------------------------------------------------------------------
# The pool: manifest, resume, workers


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    path = out_dir / MANIFEST
    tmp = _temp_path(path)
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _identity(version: str | None, params: dict | None, source_sha256: str | None) -> dict:
    """What must match for an existing output directory to be resumed."""
    return {"version": version, **(params or {}), "source_sha256": source_sha256}


def _complete_entries(out_dir: Path, spec: ScaleSpec, source_sha256: str) -> dict[int, dict]:
    """Manifest entries of parts already on disk with their recorded size and sha256."""
    path = out_dir / MANIFEST
    if not path.exists():
        return {}
    old = json.loads(path.read_text(encoding="utf-8"))
    had = _identity(old.get("version"), old.get("params"), old.get("source", {}).get("sha256"))
    want = _identity(VERSION, asdict(spec), source_sha256)
    if had != want:
        diff = {k: (had.get(k), want[k]) for k in want if had.get(k) != want[k]}
        raise ScalePoolError(f"{str(out_dir)!r} holds a different pool (found, requested): {diff}; use another directory")
    done = {}
    for entry in old.get("files", []):
        part = out_dir / entry["name"]
        if (part.exists() and part.stat().st_size == entry["bytes"]
                and entry["docs"] == spec.file_range(entry["index"])[1] - entry["first_doc"]
                and file_sha256(part) == entry["sha256"]):
            done[entry["index"]] = entry
    return done


_WORKER: dict = {}


def _init_worker(pool: SourcePool, spec: ScaleSpec, out_dir: Path) -> None:
    _WORKER.update(pool=pool, spec=spec, out_dir=out_dir)  # inherited by fork, not pickled


def _worker_part(k: int) -> dict:
    return write_part(_WORKER["pool"], _WORKER["spec"], k, _WORKER["out_dir"])


def make_scale_pool(source: str | Path, out_dir: str | Path, spec: ScaleSpec, workers: int = 1,
                    log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    """Generate (or finish) the pool in out_dir; returns the manifest."""
    if workers < 1:
        raise ScalePoolError(f"--workers must be >= 1, got {workers}")
    source, out_dir = Path(source), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source_sha256 = file_sha256(source)
    done = _complete_entries(out_dir, spec, source_sha256)
    todo = [k for k in range(spec.n_files) if k not in done]
    old_source = json.loads((out_dir / MANIFEST).read_text())["source"] if done else {}
    manifest = {
        "generator": "benchmarks/make_scale_pool.py", "version": VERSION, "params": asdict(spec),
        "source": {"path": str(source), "size": source.stat().st_size, "sha256": source_sha256,
                   "docs": old_source.get("docs"), "chars": old_source.get("chars"), "skipped": old_source.get("skipped")},
        "files": [], "counts": {}, "complete": False,
    }

    def publish() -> None:
        manifest["files"] = [done[k] for k in sorted(done)]
        manifest["counts"] = {key: sum(e["counts"][key] for e in manifest["files"]) for key in COUNT_KEYS}
        manifest["complete"] = len(done) == spec.n_files
        _write_manifest(out_dir, manifest)

    if todo:
        t0 = time.perf_counter()
        pool = load_source(source)
        manifest["source"].update(docs=len(pool), chars=sum(map(len, pool.texts)), skipped=pool.skipped)
        log(f"source: {len(pool):,} documents ({pool.skipped} skipped) in {time.perf_counter() - t0:.1f} s; "
            f"{len(done)} of {spec.n_files} parts already complete")
        publish()  # records the arguments before the first part, so a different rerun is refused
        t0 = time.perf_counter()
        if workers == 1 or len(todo) == 1:
            results = (write_part(pool, spec, k, out_dir) for k in todo)
            ctx = None
        else:
            ctx = multiprocessing.get_context("fork").Pool(min(workers, len(todo)), _init_worker, (pool, spec, out_dir))
            results = ctx.imap_unordered(_worker_part, todo)
        try:
            for entry in results:
                done[entry["index"]] = entry
                publish()
                n = sum(done[k]["docs"] for k in done if k in todo)
                log(f"{entry['name']}: {entry['docs']:,} docs, {entry['bytes'] / 1e6:.1f} MB; "
                    f"{n:,} docs in {time.perf_counter() - t0:.1f} s ({n / (time.perf_counter() - t0):,.0f} docs/s)")
        finally:
            if ctx is not None:
                ctx.terminate()
    else:
        log(f"all {spec.n_files} parts already complete")
        publish()
    return manifest


KIND_NAMES = {PERTURBED: "perturbed", EXACT_DUP: "exact_duplicate", NEAR_DUP: "near_duplicate"}
TRUTH_BATCH = 1_000_000


def ground_truth(pool: SourcePool, spec: ScaleSpec, start: int, stop: int) -> dict[str, np.ndarray]:
    """Planted duplicates of positions [start, stop): kind, target (copied position, -1 for a perturbed
    document), root (the perturbed document it derives from), source (the root's source document) and
    near_edits (one-edit copies between it and its root); every array (n,)."""
    planner = DocumentPlanner(pool, spec)
    g = np.arange(start, stop, dtype=np.int64)
    p, root, chains = planner.resolve(g)
    return {"position": g, "kind": p["kind"].astype(np.int8),
            "target": np.where(p["kind"] == PERTURBED, -1, p["target"]).astype(np.int64),
            "root": root.astype(np.int64), "source": planner.plan(root)["src"].astype(np.int64),
            "near_edits": np.fromiter(map(len, chains), dtype=np.int32, count=len(chains))}


def write_ground_truth(source: str | Path, spec: ScaleSpec, path: str | Path) -> int:
    """Write ground_truth for every position of the pool to a Parquet file (aside, then renamed); returns rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pool = load_source(source)
    path = Path(path)
    tmp = _temp_path(path)
    writer = None
    try:
        for a in range(0, spec.docs, TRUTH_BATCH):
            t = ground_truth(pool, spec, a, min(a + TRUTH_BATCH, spec.docs))
            table = pa.table({**t, "kind": pa.array([KIND_NAMES[k] for k in t["kind"].tolist()], pa.string()),
                              "id": pa.array([f"scale{spec.seed}-{g:010d}" for g in t["position"].tolist()])})
            writer = writer or pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table)
        writer.close()
        writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return spec.docs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="jsonl or jsonl.zst file of records with a 'text' field")
    ap.add_argument("out_dir")
    ap.add_argument("--docs", type=int, required=True, help="documents to generate")
    ap.add_argument("--docs-per-file", type=int, default=500_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dup-rate", type=float, default=0.05, help="fraction that are exact copies of an earlier document")
    ap.add_argument("--near-dup-rate", type=float, default=0.10, help="fraction that are one edit away from an earlier document")
    ap.add_argument("--workers", type=int, default=1, help="processes, one part at a time each (output is identical)")
    ap.add_argument("--truth", metavar="FILE", help="also write the planted duplicates (ground truth) to this Parquet file")
    args = ap.parse_args(argv)
    spec = ScaleSpec(docs=args.docs, docs_per_file=args.docs_per_file, seed=args.seed,
                     dup_rate=args.dup_rate, near_dup_rate=args.near_dup_rate)
    manifest = make_scale_pool(args.source, args.out_dir, spec, workers=args.workers)
    if args.truth:
        write_ground_truth(args.source, spec, args.truth)
    c = manifest["counts"]
    print(f"{c['documents']:,} documents in {len(manifest['files'])} parts -> {args.out_dir} "
          f"({c['exact_duplicates']:,} exact duplicates, {c['near_duplicates']:,} near duplicates, "
          f"{c['perturbed']:,} perturbed)")
    return manifest


if __name__ == "__main__":
    try:
        main()
    except ScalePoolError as exc:
        sys.exit(f"make_scale_pool: {exc}")
