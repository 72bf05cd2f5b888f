"""Split the shipped sample pool into date partitions: `python deployments/demo_partitions.py ROOT`.

Writes ROOT/date=YYYY-MM-DD/part-0.jsonl.zst for `--days` consecutive dates ending at `--end`
(default today, UTC); document i goes to partition i mod days, so every partition is a slice of
the whole mix. A stand-in for a bucket that receives one directory of raw documents a day.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[1]
SAMPLE_POOL = REPO / "examples" / "data" / "pool.jsonl.zst"


def split_sample(root: str | Path, dates: list[date], source: str | Path = SAMPLE_POOL,
                 limit: int | None = None) -> dict[date, int]:
    """Write each date's slice of `source` (first `limit` lines if given); returns docs per date."""
    with open(source, "rb") as fh:
        lines = zstandard.ZstdDecompressor().stream_reader(fh).read().splitlines()
    lines = [ln for ln in lines if ln.strip()][:limit]
    counts = {}
    for i, d in enumerate(dates):
        part = Path(root) / f"date={d.isoformat()}"
        part.mkdir(parents=True, exist_ok=True)
        chunk = lines[i::len(dates)]
        (part / "part-0.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(b"\n".join(chunk) + b"\n"))
        counts[d] = len(chunk)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="partition root to write date=YYYY-MM-DD/ directories into")
    p.add_argument("--days", type=int, default=3, help="number of daily partitions (default 3)")
    p.add_argument("--end", type=date.fromisoformat, default=None, help="newest date, YYYY-MM-DD (default today)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N sample documents")
    args = p.parse_args(argv)
    if args.days < 1:
        p.error(f"--days {args.days}: must be >= 1")
    end = args.end or datetime.now(timezone.utc).date()
    dates = [end - timedelta(days=k) for k in range(args.days - 1, -1, -1)]
    for d, n in split_sample(args.root, dates, limit=args.limit).items():
        print(f"{Path(args.root) / ('date=' + d.isoformat())}: {n} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
