"""Build the full-pool benchmark task: target = half of the Python 3.11 docs, pool = everything else.

    python benchmarks/make_python_task.py ../shared/data/debian-pool-v1.jsonl.zst runs/python-task

Writes pool.jsonl.zst (the shared pool minus the target documents) and target.jsonl; the
split is seeded, so the task is the same on every machine.
"""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import zstandard

TARGET_SOURCE = "python3.11-doc"
SEED = 2026


def main(src: str, out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fh:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8")
        lines = reader.readlines()
    python_ids = sorted(json.loads(ln)["id"] for ln in lines if f'"source": "{TARGET_SOURCE}"' in ln)
    rng = random.Random(SEED)
    target_ids = set(rng.sample(python_ids, len(python_ids) // 2))
    pool, target = [], []
    for ln in lines:
        rec_id = json.loads(ln)["id"] if f'"source": "{TARGET_SOURCE}"' in ln else None
        (target if rec_id in target_ids else pool).append(ln if ln.endswith("\n") else ln + "\n")
    (out_dir / "target.jsonl").write_text("".join(target), encoding="utf-8")
    with open(out_dir / "pool.jsonl.zst", "wb") as fh:
        with zstandard.ZstdCompressor(level=3, threads=2).stream_writer(fh) as w:
            w.write("".join(pool).encode("utf-8"))
    print(f"pool: {len(pool):,} docs, target: {len(target):,} docs -> {out_dir}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
