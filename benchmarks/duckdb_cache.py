"""How much memory DuckDB keeps while a table grows by committed inserts, under its memory cap.

    python benchmarks/duckdb_cache.py --batches 50 --memory-limit 1GB

Ingest loads every document into `ingest_docs` in one transaction per input; the flow process's
resident memory grows during that load. This inserts synthetic documents (100,000 per batch,
20-100 words of 6 letters each, about the scale pool's size) into a fresh DuckDB file in one
transaction per batch, as ingest does, and prints after every fifth batch the process's RSS and
what DuckDB itself reports holding (`duckdb_memory()`): whether the growth is DuckDB's block
cache, and whether its cap bounds it.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

BATCH = 100_000


def _rss_mb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=50, help="batches of 100,000 documents (default 50: 5M)")
    ap.add_argument("--memory-limit", default="1GB", help="DuckDB's memory_limit (quadflow's default: 1GB)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    words = np.array(["".join(rng.choice(list("abcdefghijklmnop"), 6)) for _ in range(20_000)])
    picks = rng.integers(0, words.size, (BATCH, 100))  # (BATCH, 100) word ids; batch i shifts them by i
    with tempfile.TemporaryDirectory() as tmp:
        con = duckdb.connect(str(Path(tmp) / "cache.duckdb"), config={"memory_limit": args.memory_limit})
        con.execute("create table docs (doc_idx bigint, doc_id varchar, text varchar, n_tokens integer)")
        print(f"memory_limit {args.memory_limit}")
        print("documents | RSS (MB) | peak RSS (MB) | DuckDB holds (MB)")
        for i in range(args.batches):
            n_words = 20 + i % 80
            rows = pa.table({  # noqa: F841 (read by DuckDB's replacement scan below)
                "doc_idx": np.arange(i * BATCH, (i + 1) * BATCH),
                "doc_id": [f"{i:04d}-{j:08x}" for j in range(BATCH)],
                "text": [" ".join(words[(r + i) % words.size]) for r in picks[:, :n_words]],
                "n_tokens": np.full(BATCH, n_words, dtype=np.int32),
            })
            con.execute("begin")
            con.execute("insert into docs select * from rows")
            con.execute("commit")
            if (i + 1) % 5 == 0:
                held = con.execute("select sum(memory_usage_bytes) // 1048576 from duckdb_memory()").fetchone()[0]
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
                print(f"{(i + 1) * BATCH:,} | {_rss_mb():,} | {peak:,} | {held:,}", flush=True)
        tags = con.execute("select tag, memory_usage_bytes // 1048576 from duckdb_memory() "
                           "where memory_usage_bytes > 0 order by 2 desc").fetchall()
        print("DuckDB's memory by tag (MB):", ", ".join(f"{t} {mb:,}" for t, mb in tags))
        con.close()


if __name__ == "__main__":
    main()
