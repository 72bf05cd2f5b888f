"""Rebuild the shipped demo sample from the shared Debian pool (deterministic).

    python examples/make_sample.py ../shared/data/debian-pool-v1.jsonl.zst examples/data

Only permissively licensed sources are sampled; examples/data/ATTRIBUTION.md lists them.
The target set is a slice of the Python 3.11 documentation; the pool holds the rest of the
Python docs mixed with Django and PostgreSQL manuals, WordNet entries, fortunes, The Devil's
Dictionary and the Jargon File, so a good selection has something to find.
"""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import zstandard

# source -> (docs in the pool sample, license as recorded in the pool)
POOL_QUOTA = {
    "python3.11-doc": 160,
    "python-django-doc": 350,
    "postgresql-doc-15": 350,
    "wordnet-3.0": 1500,
    "fortunes": 1200,
    "dict-devil": 300,
    "dict-jargon": 400,
}
TARGET_SOURCE, TARGET_DOCS = "python3.11-doc", 120
MAX_CHARS = 12_000  # keeps the sample small; longer pages are cut at a paragraph break


def main(src: str, out: str) -> None:
    by_source: dict[str, list[dict]] = {s: [] for s in POOL_QUOTA}
    with open(src, "rb") as fh:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8")
        for line in reader:
            rec = json.loads(line)
            if rec["source"] in by_source:
                by_source[rec["source"]].append(rec)
    rng = random.Random(20261123)
    pool, target = [], []
    for source, quota in POOL_QUOTA.items():
        docs = by_source[source]
        rng.shuffle(docs)
        if source == TARGET_SOURCE:
            target, docs = docs[:TARGET_DOCS], docs[TARGET_DOCS:]
        pool.extend(docs[:quota])
    rng.shuffle(pool)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(out_dir / "pool.jsonl.zst", pool)
    _write(out_dir / "target.jsonl.zst", target)
    print(f"pool: {len(pool)} docs, target: {len(target)} docs -> {out_dir}")


def _cut(text: str) -> str:
    if len(text) <= MAX_CHARS:
        return text
    cut = text.rfind("\n\n", 0, MAX_CHARS)
    return text[: cut if cut > 0 else MAX_CHARS]


def _write(path: Path, records: list[dict]) -> None:
    keep = ("id", "source", "domain", "lang", "license", "title", "text")
    lines = [json.dumps({k: (_cut(r[k]) if k == "text" else r[k]) for k in keep if k in r},
                        ensure_ascii=False) for r in records]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(zstandard.ZstdCompressor(level=19).compress(data))


if __name__ == "__main__":
    main(*sys.argv[1:3])
