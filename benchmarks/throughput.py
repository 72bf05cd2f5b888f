"""Throughput and memory: quadflow's stages against the DSIR package and datatrove, on the same documents.

    python -m benchmarks.throughput                                 # 10k, 100k and all 354k documents
    python -m benchmarks.throughput --sizes 10000 --out runs/bench/throughput-smoke
    python -m benchmarks.throughput --external-max-docs 100000      # skip the slow references above 100k

Each size runs in a fresh process. For each size the shared pool is subsampled deterministically (a hash of (seed, id) orders the
documents, so 10k is a subset of 100k; `all` is the file itself), then, one after another on the
same documents:

- quadflow, stage by stage through the task functions (no Prefect): ingest, featurize, cluster,
  score (heuristic + dsir + classifier), select (Quad bandit), export, report; end to end is
  their sum. Also two cores timed alone, like for like with the references: the heuristic
  scorer (Gopher/C4/FineWeb rules) and DSIR weights (hashed 1-2-grams + fit + log weights).
- the DSIR package (`data-selection`, unmodified): fit_importance_estimator +
  compute_importance_weights, with as many processes as --workers (staging its input is timed apart);
- datatrove: Gopher repetition + Gopher quality + C4 + FineWeb filters (benchmarks/datatrove_ref.py),
  --workers processes over as many input shards (sharding is not timed).

Per step: wall seconds, CPU seconds (this process and every child, from /proc), documents/s,
MB/s (UTF-8 text), documents/s per core (documents per CPU-second) and peak RSS (the sampler of
benchmarks/stages.py, summed over the process tree so worker processes count; the measuring
process itself holds a few hundred MB of libraries and data, shown as "RSS at start"). Ratios are
quadflow's documents/s over each reference's (> 1: quadflow is faster). Writes throughput.csv
and throughput.md to --out and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO))

from benchmarks.bench import DEFAULT_SOURCE, DEFAULT_TASKS_DIR, _commit, _table, machine, subsample_jsonl  # noqa: E402
from benchmarks.eval.tasks import TASKS, build_tasks, iter_lines  # noqa: E402
from benchmarks.stages import PeakRSS, _rss_mb  # noqa: E402

DEFAULT_OUT = REPO / "runs" / "bench" / "throughput"
DEFAULT_SIZES = ("10000", "100000", "all")
TARGET_TASK = "python-docs"  # its target sample is the target every scorer and DSIR fit against
BUDGET_FRACTION = 0.02  # the select stage's budget, as in benchmarks/bench.py
_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# Measuring a process tree
# --------------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    kids = [int(x) for x in fh.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process (all its threads), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14, 15 of stat)


def _rss_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


class TreeSampler(PeakRSS):
    """PeakRSS (benchmarks/stages.py) over this process and its children, plus their CPU seconds.

    A worker pool's memory and CPU count toward the step that started it. CPU of a child is its
    last sampled value, so a child living less than one sampling period may be missed.
    """

    def __init__(self, every: float = 0.02):
        self._lock = threading.Lock()
        self._me = os.getpid()
        self._cpu_base: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        super().__init__(every)

    def _sample(self) -> None:
        pids = [self._me, *_descendants(self._me)]
        rss = _rss_mb() + sum(_rss_of(p) for p in pids[1:])
        cpu = {p: c for p in pids if (c := _cpu_seconds(p)) is not None}
        with self._lock:
            self.peak = max(self.peak, rss)
            for p, c in cpu.items():
                self._cpu_base.setdefault(p, 0.0)  # born after reset: all its CPU is this step's
                self._cpu_last[p] = c

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every)

    def reset(self) -> None:
        pids = [self._me, *_descendants(self._me)]
        base = {p: c for p in pids if (c := _cpu_seconds(p)) is not None}
        with self._lock:
            self.peak = _rss_mb() + sum(_rss_of(p) for p in pids[1:])
            self._cpu_base, self._cpu_last = base, dict(base)

    def cpu(self) -> float:
        """CPU seconds spent by the tree since `reset` (this process measured exactly, now)."""
        self._sample()
        with self._lock:
            return sum(last - self._cpu_base.get(p, 0.0) for p, last in self._cpu_last.items())


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One timed step on one pool size."""

    size: str
    tool: str  # quadflow | dsir-package | datatrove
    step: str
    docs: int
    mb: float  # UTF-8 text megabytes of those documents
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    base_rss_mb: float = 0.0  # the tree's resident memory when the step started
    note: str = ""

    def row(self) -> dict[str, Any]:
        s = max(self.seconds, 1e-9)
        return {
            "size": self.size, "tool": self.tool, "step": self.step, "docs": self.docs, "mb": round(self.mb, 1),
            "seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2),
            "cores_used": round(self.cpu_seconds / s, 2), "docs_per_s": round(self.docs / s, 1),
            "mb_per_s": round(self.mb / s, 3),
            "docs_per_s_per_core": round(self.docs / max(self.cpu_seconds, 1e-9), 1),
            "peak_rss_mb": round(self.peak_rss_mb), "base_rss_mb": round(self.base_rss_mb), "note": self.note,
        }


class Timer:
    """Times steps with one TreeSampler and collects them."""

    def __init__(self, log: Callable[[str], None] = print):
        self.sampler = TreeSampler()
        self.steps: list[Step] = []
        self.log = log

    def __call__(self, size: str, tool: str, step: str, docs: int, mb: float, fn, *args, note: str = ""):
        self.sampler.reset()
        base = self.sampler.peak
        t0 = time.perf_counter()
        out = fn(*args)
        seconds = time.perf_counter() - t0
        st = Step(size, tool, step, docs, mb, seconds, self.sampler.cpu(), self.sampler.peak, base, note)
        self.steps.append(st)
        r = st.row()
        self.log(f"  {tool:>12} {step:<22} {r['seconds']:8.2f} s  {r['docs_per_s']:>10,.0f} docs/s  "
                 f"{r['cores_used']:.2f} cores  peak RSS {r['peak_rss_mb']:>6,} MB")
        return out

    def stop(self) -> None:
        self.sampler.stop()


def pool_for(size: str, source: Path, work: Path) -> Path:
    """The pool file of one size: the source itself for 'all', else its nested seeded subsample."""
    if size == "all":
        return source
    path = work / f"pool-{int(size)}.jsonl.zst"
    subsample_jsonl(source, path, int(size))
    return path


def text_stats(path: Path) -> tuple[int, float]:
    """Documents and UTF-8 text megabytes of a JSONL pool."""
    n, nbytes = 0, 0
    for line in iter_lines(path):
        text = json.loads(line).get("text")
        n += 1
        nbytes += len(text.encode("utf-8")) if isinstance(text, str) else 0
    return n, nbytes / 1e6


def run_quadflow(timer: Timer, size: str, pool: Path, target: Path, work: Path, docs: int, mb: float) -> None:
    """Every stage through its task function, then the two like-for-like cores on texts in memory."""
    from quadflow.settings import build_settings
    from quadflow.store import connect, open_store, query_sql
    from quadflow.tasks.cluster import cluster
    from quadflow.tasks.export import export
    from quadflow.tasks.featurize import featurize, hashed_ngrams, load_ngrams
    from quadflow.tasks.ingest import expand_inputs, fingerprint_files, ingest
    from quadflow.tasks.report import report
    from quadflow.tasks.score import score
    from quadflow.tasks.scorers import ScoreInput, get_scorer
    from quadflow.tasks.scorers.dsir import DSIR

    store_path = work / "quadflow.duckdb"
    for p in (store_path, store_path.with_name(store_path.name + ".wal")):
        p.unlink(missing_ok=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    base = {
        "store": str(store_path), "seed": 0,
        "ingest": {"inputs": [str(pool)], "targets": [str(target)]},
        "score": {"scorers": ["heuristic", "dsir", "classifier"]},
        "select": {"selector": "quad", "budget_tokens": 1},
        "export": {"output": str(work / "out")},
    }
    s = build_settings(overrides=base)
    q = "quadflow"
    store = open_store(s.store)
    files, targets = timer(size, q, "checksum", docs, mb, lambda: (
        fingerprint_files(expand_inputs(s.ingest.inputs)), fingerprint_files(expand_inputs(s.ingest.targets))))
    d = timer(size, q, "ingest", docs, mb, ingest.fn, s.ingest, files, targets, store)
    with connect(store, read_only=True) as con:
        (pool_tokens,) = con.execute("select sum(n_tokens) from ingest_docs where key = ? and role = 'pool'",
                                     [d.key]).fetchone()
    s = build_settings(overrides=base | {"select": {"selector": "quad",
                                                    "budget_tokens": max(1, round(BUDGET_FRACTION * pool_tokens))}})
    f = timer(size, q, "featurize", docs, mb, featurize.fn, s.featurize, d, s.seed)
    c = timer(size, q, "cluster", docs, mb, cluster.fn, s.cluster, f, s.seed, d)
    sc = timer(size, q, "score", docs, mb, score.fn, s.score, d, f, s.seed)
    from quadflow.tasks.select import select

    sel = timer(size, q, "select (quad)", docs, mb, select.fn, s.select, d, f, c, sc, s.seed)
    ex = timer(size, q, "export", docs, mb, export.fn, s, files, targets, d, c, sc, sel)
    timer(size, q, "report", docs, mb, report.fn, s, d, f, c, sc, sel, ex)
    stages = [st for st in timer.steps if st.size == size and st.tool == q]
    timer.steps.append(Step(size, q, "end to end", docs, mb, sum(st.seconds for st in stages),
                            sum(st.cpu_seconds for st in stages), max(st.peak_rss_mb for st in stages),
                            min(st.base_rss_mb for st in stages), "sum of the stages above"))
    e = timer.steps[-1].row()
    timer.log(f"  {q:>12} {'end to end':<22} {e['seconds']:8.2f} s  {e['docs_per_s']:>10,.0f} docs/s")

    # Like-for-like cores on texts already in memory (what the references compute).
    with connect(store, read_only=True) as con:
        texts = pl.from_arrow(query_sql(con, "featurize_texts", {"key": d.key, "role": "pool"})
                              .fetch_arrow_table().column("text")).alias("text")
        target_counts = load_ngrams(con, f.key, "target")
    n_pool = texts.len()
    heuristic = get_scorer("heuristic")(random_state=0)
    timer(size, q, "core: heuristic rules", n_pool, mb, heuristic.run, ScoreInput(n_docs=n_pool, texts=texts),
          note="Gopher/C4/FineWeb rules, texts in memory")

    def dsir_weights():
        counts = hashed_ngrams(texts, s.featurize.dsir_buckets, s.featurize.max_chars)
        return DSIR().fit(target_counts, counts).log_weights(counts)

    timer(size, q, "core: DSIR weights", n_pool, mb, dsir_weights,
          note="hashed 1-2-grams (first max_chars) + fit + log weights")


def run_dsir_package(timer: Timer, size: str, pool: Path, target: Path, work: Path, docs: int, mb: float,
                     workers: int) -> None:
    """The published DSIR's importance-weight computation (fit + weights) on the same documents."""
    from data_selection import HashedNgramDSIR
    from nltk.tokenize import WordPunctTokenizer

    from benchmarks.eval.dsir_external import _stage

    work = work / "dsir"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    timer(size, "dsir-package", "stage input (JSONL)", docs, mb, lambda: (
        _stage(pool, work / "raw.jsonl"), _stage(target, work / "target.jsonl")),
        note="copy to {id, text} JSON lines; not part of the ratio")
    dsir = HashedNgramDSIR(raw_datasets=[str(work / "raw.jsonl")], target_datasets=[str(work / "target.jsonl")],
                           cache_dir=str(work / "cache"), num_proc=workers, ngrams=2, num_buckets=10_000,
                           tokenizer="wordpunct")
    dsir.tokenizer = WordPunctTokenizer().tokenize  # picklable under nltk >= 3.10 (see dsir_external.py)

    def weights():
        dsir.fit_importance_estimator(num_tokens_to_fit="auto")
        dsir.compute_importance_weights()

    timer(size, "dsir-package", "fit + weights", docs, mb, weights, note=f"num_proc={workers}, wordpunct")
    shutil.rmtree(work, ignore_errors=True)


def run_datatrove(timer: Timer, size: str, pool: Path, work: Path, docs: int, mb: float, workers: int) -> None:
    """datatrove's Gopher/C4/FineWeb filter pipeline on the same documents, one shard per worker."""
    from benchmarks.datatrove_ref import run_filters, shard_jsonl

    work = work / "datatrove"
    shutil.rmtree(work, ignore_errors=True)
    shards = shard_jsonl(iter_lines(pool), work / "data", workers)
    result = timer(size, "datatrove", "filters (4) + writer", docs, mb, run_filters, work / "data", workers,
                   work / "run", note=f"{workers} workers x {len(shards)} shards")
    timer.steps[-1].note += f"; kept {result.docs_kept:,} of {result.docs_in:,}"
    shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


RATIOS = (  # (quadflow step, reference tool, reference step, what is compared)
    ("end to end", "datatrove", "filters (4) + writer", "quadflow end to end vs datatrove filter pipeline"),
    ("core: heuristic rules", "datatrove", "filters (4) + writer", "quality rules alone vs datatrove filters"),
    ("end to end", "dsir-package", "fit + weights", "quadflow end to end vs DSIR package weights"),
    ("core: DSIR weights", "dsir-package", "fit + weights", "DSIR weights vs DSIR package weights"),
)


def ratios(rows: list[dict]) -> list[dict]:
    """quadflow's documents/s (wall and per core) over each reference's, per size."""
    by = {(r["size"], r["tool"], r["step"]): r for r in rows}
    out = []
    for size in dict.fromkeys(r["size"] for r in rows):
        for q_step, tool, ref_step, what in RATIOS:
            q, ref = by.get((size, "quadflow", q_step)), by.get((size, tool, ref_step))
            if q and ref:
                out.append({"size": size, "comparison": what,
                            "wall_ratio": q["docs_per_s"] / max(ref["docs_per_s"], 1e-9),
                            "per_core_ratio": q["docs_per_s_per_core"] / max(ref["docs_per_s_per_core"], 1e-9),
                            "rss_ratio": q["peak_rss_mb"] / max(ref["peak_rss_mb"], 1e-9)})
    return out


def render(rows: list[dict], meta: dict) -> str:
    lines = ["# Throughput and memory", "",
             f"- date: {meta['date']}", f"- command: `{meta['command']}`", f"- commit: {meta['commit']}",
             f"- machine: {meta['machine']}; load average {meta['load_start']} at start, {meta['load_end']} at end",
             f"- wall time {meta['seconds']:.0f} s", ""]
    for size in dict.fromkeys(r["size"] for r in rows):
        sub = [r for r in rows if r["size"] == size]
        lines += [f"## {sub[0]['docs']:,} documents ({sub[0]['mb']:,.0f} MB of text)", ""]
        lines += _table(["tool", "step", "wall s", "CPU s", "cores", "docs/s", "MB/s", "docs/s/core", "peak RSS MB",
                         "RSS at start MB", "note"],
                        [[r["tool"], r["step"], f"{r['seconds']:,.1f}", f"{r['cpu_seconds']:,.1f}", r["cores_used"],
                          f"{r['docs_per_s']:,.0f}", f"{r['mb_per_s']:,.2f}", f"{r['docs_per_s_per_core']:,.0f}",
                          f"{r['peak_rss_mb']:,}", f"{r['base_rss_mb']:,}", r["note"]] for r in sub]) + [""]
    rat = ratios(rows)
    if rat:
        lines += ["## Ratios (quadflow / reference; > 1 means quadflow is faster or uses more memory)", ""]
        lines += _table(["documents", "comparison", "docs/s ratio", "docs/s per core ratio", "peak RSS ratio"],
                        [[r["size"], r["comparison"], f"{r['wall_ratio']:.2f}", f"{r['per_core_ratio']:.2f}",
                          f"{r['rss_ratio']:.2f}"] for r in rat]) + [""]
    return "\n".join(lines)


def measure_size(size: str, source: Path, target: Path, out: Path, workers: int, external_max_docs: int | None,
                 skip: list[str]) -> list[dict]:
    """Every tool on one pool size, in this process; the steps' rows."""
    timer = Timer(log=lambda m: print(m, flush=True))
    try:
        work = out / f"n{size}"
        work.mkdir(parents=True, exist_ok=True)
        pool = pool_for(size, source, work)
        docs, mb = text_stats(pool)
        print(f"{size}: {docs:,} documents, {mb:,.0f} MB of text ({pool})", flush=True)
        if "quadflow" not in skip:
            run_quadflow(timer, size, pool, target, work, docs, mb)
        external = external_max_docs is None or docs <= external_max_docs
        if external and "dsir-package" not in skip:
            run_dsir_package(timer, size, pool, target, work, docs, mb, workers)
        if external and "datatrove" not in skip:
            run_datatrove(timer, size, pool, work, docs, mb, workers)
    finally:
        timer.stop()
    return [st.row() for st in timer.steps]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="document counts, or 'all'")
    ap.add_argument("--source", default=str(DEFAULT_SOURCE))
    ap.add_argument("--tasks-dir", default=str(DEFAULT_TASKS_DIR), help="where the target task is (built if missing)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--workers", type=int, default=2, help="processes for the DSIR package and datatrove")
    ap.add_argument("--external-max-docs", type=int, default=None,
                    help="run the DSIR package and datatrove only on sizes up to this many documents")
    ap.add_argument("--skip", nargs="*", default=[], choices=["quadflow", "dsir-package", "datatrove"])
    ap.add_argument("--rows-json", help=argparse.SUPPRESS)  # one size in this process, rows to this file
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the DSIR package's progress bars
    os.environ.setdefault("LOGURU_LEVEL", "WARNING")  # datatrove's per-task logs, in its workers too
    for s in args.sizes:
        if s != "all" and not (s.isdigit() and int(s) > 0):
            ap.error(f"--sizes {s!r}: a positive document count or 'all'")
    source, out, tasks_dir = Path(args.source), Path(args.out), Path(args.tasks_dir)
    target = tasks_dir / TARGET_TASK / "target.jsonl"
    if args.rows_json:
        (size,) = args.sizes
        rows = measure_size(size, source, target, out, args.workers, args.external_max_docs, args.skip)
        Path(args.rows_json).write_text(json.dumps(rows))
        return 0

    start, load_start = time.perf_counter(), " ".join(f"{x:.1f}" for x in os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    if not (tasks_dir / TARGET_TASK / "task.json").exists():
        build_tasks(source, tasks_dir, [TASKS[TARGET_TASK]])
    rows: list[dict] = []
    for size in args.sizes:
        # A fresh process per size: memory one size leaves behind does not inflate the next one's RSS.
        part = out / f"n{size}" / "rows.json"
        part.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "benchmarks.throughput", "--sizes", size, "--rows-json", str(part),
               "--source", str(source), "--tasks-dir", str(tasks_dir), "--out", str(out),
               "--workers", str(args.workers)]
        if args.external_max_docs is not None:
            cmd += ["--external-max-docs", str(args.external_max_docs)]
        if args.skip:
            cmd += ["--skip", *args.skip]
        subprocess.run(cmd, check=True, cwd=REPO)
        rows += json.loads(part.read_text())
        pl.DataFrame(rows).write_csv(out / "throughput.csv")  # kept current after every size
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python -m benchmarks.throughput", *(argv if argv is not None else sys.argv[1:])]),
            "commit": _commit(), "machine": machine(), "load_start": load_start,
            "load_end": " ".join(f"{x:.1f}" for x in os.getloadavg()), "seconds": time.perf_counter() - start}
    md = render(rows, meta)
    (out / "throughput.md").write_text(md + "\n")
    (out / "throughput.json").write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios(rows)}, indent=2))
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
