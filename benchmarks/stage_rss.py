"""Peak RSS of ONE stage in a fresh process, over a store whose upstream stages are done.

    python benchmarks/stages.py --config cfg.yaml            # once: every stage, fills the store
    python benchmarks/stage_rss.py --config cfg.yaml --stage featurize   # prints JSON

A process that ran earlier stages keeps some of their memory (allocator caches), so per-stage
peaks measured in one long process mix stages. Here the upstream references are rebuilt from the
store without recomputing (ingest finds its inputs unchanged; featurize's and cluster's
partitions are read back), then the stage's task function runs again on a copy of the store in
which its own partition has been removed, and the JSON gives the RSS before it (`start_rss_mb`)
and the peak while it ran (`peak_rss_mb`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from quadflow.settings import build_settings
from quadflow.store import connect, make_ref, open_store

STAGES = ("featurize", "cluster", "score")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--stage", choices=STAGES, required=True)
    args = ap.parse_args(argv)

    import benchmarks.stages as bs
    from quadflow.tasks.cluster import cluster
    from quadflow.tasks.featurize import featurize
    from quadflow.tasks.ingest import expand_inputs, fingerprint_files, ingest
    from quadflow.tasks.score import score

    settings = build_settings(args.config)
    src = Path(settings.store)
    work = src.with_name(f"rss-{args.stage}.duckdb")
    for p in work.parent.glob(f"{work.name}*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.copyfile(src, work)
    store = open_store(work)
    files = fingerprint_files(expand_inputs(settings.ingest.inputs))
    targets = fingerprint_files(expand_inputs(settings.ingest.targets))
    docs = ingest.fn(settings.ingest, files, targets, store)  # unchanged inputs: nothing read
    with connect(store) as con:
        fkey = con.execute("select key from featurize_info").fetchone()[0]
        features = make_ref(con, "featurize", fkey, store, "featurize_vectors", ["role", "doc_idx", "vec"])
        # the stage under test recomputes from scratch: its ledger and partition go
        con.execute("delete from shard_done where stage = ?", [args.stage])
        if args.stage == "featurize":
            # its vectors and n-grams are views over the recorded parts: with the ledger gone they point at
            # this store's own parts once featurize has written them
            con.execute("delete from featurize_info")
        elif args.stage == "score":
            con.execute("delete from score_combined")
            con.execute("delete from score_info")
        con.execute("checkpoint")

    sampler = bs.PeakRSS()
    sampler.reset()
    start = sampler.peak
    t0 = time.perf_counter()
    if args.stage == "featurize":
        featurize.fn(settings.featurize, docs, settings.seed, settings.run)
    elif args.stage == "cluster":
        cluster.fn(settings.cluster, features, settings.seed, docs)
    else:
        score.fn(settings.score, docs, features, settings.seed, settings.run)
    seconds = time.perf_counter() - t0
    sampler.stop()
    print(json.dumps({"stage": args.stage, "seconds": round(seconds, 2), "start_rss_mb": round(start),
                      "peak_rss_mb": round(sampler.peak)}))
    for p in work.parent.glob(f"{work.name}*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


if __name__ == "__main__":
    main()
