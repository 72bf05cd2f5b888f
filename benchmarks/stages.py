"""Wall time and peak RSS of every stage on one pool, stage by stage, in one process.

    python benchmarks/stages.py --config benchmarks/python-task.yaml [--selector random ...]

Calls each stage's task function directly (no Prefect server, no caching) so the numbers are
the stages' own. Peak RSS is sampled from /proc/self/status every 20 ms while a stage runs
(the process's resident memory, Python and native allocations alike); `start_rss_mb` is the RSS
when the stage started, so peak - start is the stage's own working memory.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from quadflow.settings import RunSettings, build_settings
from quadflow.shards import text_parts
from quadflow.store import open_store


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


class PeakRSS:
    """Samples resident memory in a thread; `peak` is the maximum seen since `reset`."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak = every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.every)

    def reset(self) -> None:
        self.peak = _rss_mb()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--selector", action="append", help="selectors to time (default: the config's)")
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args()

    from quadflow.tasks.cluster import cluster
    from quadflow.tasks.export import export
    from quadflow.tasks.featurize import featurize
    from quadflow.tasks.ingest import expand_inputs, fingerprint_files, ingest
    from quadflow.tasks.report import report
    from quadflow.tasks.score import score
    from quadflow.tasks.select import select

    settings = build_settings(args.config)
    rows: list[dict] = []
    sampler = PeakRSS()

    def timed(stage: str, fn, *a):
        sampler.reset()
        start_rss = sampler.peak
        t0 = time.perf_counter()
        out = fn(*a)
        rows.append({"stage": stage, "seconds": round(time.perf_counter() - t0, 2),
                     "peak_rss_mb": round(sampler.peak, 0), "start_rss_mb": round(start_rss, 0)})
        print(f"{stage:>12}: {rows[-1]['seconds']:8.2f} s  peak RSS {rows[-1]['peak_rss_mb']:7.0f} MB", flush=True)
        return out

    store = open_store(settings.store)
    files, targets = timed("checksum", lambda: (fingerprint_files(expand_inputs(settings.ingest.inputs)),
                                                 fingerprint_files(expand_inputs(settings.ingest.targets))))
    docs = timed("ingest", ingest.fn, settings.ingest, files, targets, store)
    feats = timed("featurize", featurize.fn, settings.featurize, docs, settings.seed)
    clus = timed("cluster", cluster.fn, settings.cluster, feats, settings.seed, docs)
    scores = timed("score", score.fn, settings.score, docs, feats, settings.seed)
    text_parts(RunSettings(), docs.store.path, docs.key).clean()  # as the flow does once score has run
    for selector in args.selector or [settings.select.selector]:
        sel_settings = settings.select.model_copy(update={"selector": selector})
        run_settings = settings.model_copy(update={
            "select": sel_settings,
            "export": settings.export.model_copy(update={"output": f"{settings.export.output}/{selector}"}),
        })
        sel = timed(f"select:{selector}", select.fn, sel_settings, docs, feats, clus, scores, settings.seed)
        exp = timed(f"export:{selector}", export.fn, run_settings, files, targets, docs, clus, scores, sel)
        rep = timed(f"report:{selector}", report.fn, run_settings, docs, feats, clus, scores, sel, exp)
        rows.append({"stage": f"summary:{selector}", **rep.summary})
        print(json.dumps(rep.summary), flush=True)
    sampler.stop()
    total = sum(r["seconds"] for r in rows if "seconds" in r)
    print(f"{'total':>12}: {total:8.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
