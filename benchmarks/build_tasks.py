"""Build the selection benchmark's tasks (pool, target sample, held-out set) once; reruns skip built tasks.

    python -m benchmarks.build_tasks                       # every task of the shared Debian pool
    python -m benchmarks.build_tasks --task python-docs --out runs/eval-tasks
    python -m benchmarks.build_tasks --source data.jsonl.zst --define legal=collection:court-opinions

See benchmarks/eval/tasks.py for what a task holds and how the split is made.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `benchmarks.eval` importable
    sys.path.insert(0, str(REPO))

from benchmarks.eval.tasks import DEFAULT_SEED, TASKS, TaskSpec, build_tasks  # noqa: E402

DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "debian-pool-v1.jsonl.zst"
DEFAULT_OUT = REPO / "runs" / "eval-tasks"


def parse_define(text: str) -> TaskSpec:
    """NAME=FIELD:VALUE[,VALUE...] -> TaskSpec."""
    name, sep, rest = text.partition("=")
    fld, sep2, values = rest.partition(":")
    if not (sep and sep2 and name and fld and values):
        raise argparse.ArgumentTypeError(f"--define {text!r}: expected NAME=FIELD:VALUE[,VALUE...]")
    return TaskSpec(name, tuple(v for v in values.split(",") if v), field=fld)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(DEFAULT_SOURCE), help="JSONL(.gz/.zst) with id, text and a domain field")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="directory the task directories go in")
    ap.add_argument("--task", action="append", choices=sorted(TASKS), help="built-in task to build (repeatable)")
    ap.add_argument("--define", action="append", type=parse_define, default=[],
                    metavar="NAME=FIELD:VALUES", help="a task over other data (repeatable)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--force", action="store_true", help="rebuild even when task.json matches")
    args = ap.parse_args(argv)

    specs = [TASKS[t] for t in args.task or []] + args.define
    if not specs:
        specs = list(TASKS.values())
    start = time.perf_counter()
    for meta in build_tasks(args.source, args.out, specs, seed=args.seed, force=args.force):
        c, t = meta["counts"], meta["tokens"]
        print(f"{meta['spec']['name']}: pool {c['pool_docs']:,} docs / {t['pool']:,} tokens "
              f"({c['pool_domain_docs']:,} in-domain), target {c['target_docs']:,} / {t['target']:,}, "
              f"held-out {c['heldout_docs']:,} / {t['heldout']:,}")
    print(f"done in {time.perf_counter() - start:.1f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
