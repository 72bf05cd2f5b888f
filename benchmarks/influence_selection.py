"""Selection quality of the bandit probing with influence, against the same bandit probing with DSIR and random.

    python -m benchmarks.influence_selection --task runs/eval-tasks/python-docs --docs 30000 \\
        --out runs/influence/python-docs

The task (benchmarks/eval/tasks.py: a target domain cut out of the pool, a target sample and a
disjoint held-out set; build it with `python -m benchmarks.build_tasks --task python-docs`) has its
pool subsampled (the --docs documents with the smallest blake2b(seed:id), seeded), then the
pipeline's stages run on it by their task functions (no Prefect): ingest, featurize, cluster,
score (heuristic, dsir and influence: the influence scorer is fitted, it scores nothing here),
then select once per method at one budget. Each selection is judged by KL reduction toward the
target sample on hashed 1-2-grams (quadflow.metrics) and by the held-out perplexity of a
Kneser-Ney trigram model trained on it alone (benchmarks/eval, one vocabulary per task).
Prints one JSON line per stage and per method, and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import zstandard

METHODS = {  # name -> select settings beyond the budget
    "random": {"selector": "random"},
    "quad-dsir": {"selector": "quad", "probe_scorer": "dsir"},
    "quad-influence": {"selector": "quad", "probe_scorer": "influence"},
    "quad-combined": {"selector": "quad", "probe_scorer": "combined"},
}


def subsample(src: Path, dst: Path, n_docs: int, seed: int) -> int:
    """Write the n_docs records of src with the smallest blake2b(seed:id) to dst (.jsonl.zst), in file order."""
    from benchmarks.eval.tasks import iter_lines

    if dst.exists():
        return sum(1 for _ in iter_lines(dst))
    keys = [hashlib.blake2b(f"{seed}:{json.loads(line)['id']}".encode(), digest_size=8).digest()
            for line in iter_lines(src)]
    cut = sorted(keys)[min(n_docs, len(keys)) - 1]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp, kept = dst.with_name(dst.name + ".tmp"), 0
    with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
        for key, line in zip(keys, iter_lines(src)):
            if key <= cut and kept < n_docs:
                out.write((line + "\n").encode("utf-8"))
                kept += 1
    os.replace(tmp, dst)
    return kept


def main(argv: list[str] | None = None) -> None:
    from benchmarks.eval.metrics import check_protocol, evaluate_selection
    from benchmarks.eval.tasks import load_task, task_vocab
    from benchmarks.stages import PeakRSS
    from quadflow.flows.curate import resolve_inputs
    from quadflow.metrics import kl_divergence
    from quadflow.settings import build_settings
    from quadflow.store import connect, open_store, query_sql
    from quadflow.tasks.cluster import cluster
    from quadflow.tasks.featurize import featurize, load_ngrams
    from quadflow.tasks.ingest import ingest
    from quadflow.tasks.score import score
    from quadflow.tasks.select import select

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, help="task directory built by benchmarks.build_tasks")
    ap.add_argument("--out", required=True, help="work directory (pool sample, store)")
    ap.add_argument("--docs", type=int, default=30_000, help="pool documents to subsample")
    ap.add_argument("--budget-fraction", type=float, default=0.02, help="budget as a share of the pool's tokens")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--influence", default="{}", help="JSON overrides of score.influence")
    ap.add_argument("--seed", type=int, default=0, help="seed of the pipeline stages (and the influence fit)")
    ap.add_argument("--select-seeds", default="0", help="comma-separated seeds each selector runs with")
    args = ap.parse_args(argv)

    task = load_task(args.task)
    out = Path(args.out)
    pool = out / f"pool-{args.docs}.jsonl.zst"
    sampler = PeakRSS()

    def emit(**kw):
        kw["peak_rss_mb"] = round(sampler.peak)
        print(json.dumps(kw, default=str), flush=True)

    def timed(stage, fn, *a):
        sampler.reset()
        t = time.perf_counter()
        res = fn(*a)
        emit(stage=stage, seconds=round(time.perf_counter() - t, 1))
        return res

    kept = timed("subsample", subsample, task.pool_path, pool, args.docs, task.seed)
    base = {
        "store": str(out / "quadflow.duckdb"), "seed": args.seed,
        "ingest": {"inputs": [str(pool)], "targets": [str(task.target_path)]},
        "score": {"scorers": ["heuristic", "dsir", "influence"], "influence": json.loads(args.influence)},
    }
    settings = build_settings(overrides=base)
    store = open_store(settings.store)
    files, targets = resolve_inputs.fn(settings.ingest, settings.objectstore)
    docs = timed("ingest", ingest.fn, settings.ingest, files, targets, store, settings.objectstore)
    features = timed("featurize", featurize.fn, settings.featurize, docs, settings.seed)
    clusters = timed("cluster", cluster.fn, settings.cluster, features, settings.seed, docs)
    scores = timed("score", score.fn, settings.score, docs, features, settings.seed)

    with connect(store, read_only=True) as con:
        tokens = query_sql(con, "select_read_tokens", {"key": docs.key, "lo": 0, "hi": None}).fetchnumpy()["n_tokens"].astype(np.int64)
        pool_ngrams = load_ngrams(con, features.key, "pool")
        target_ngrams = np.asarray(load_ngrams(con, features.key, "target").sum(axis=0)).ravel()
        (fit,) = query_sql(con, "select_read_scorer_info", {"key": scores.key, "scorer": "influence"}).fetchone()
    emit(stage="influence-fit", **{k: v for k, v in json.loads(fit).items()
                                   if k in ("proxy_params", "proxy_seconds", "fit_seconds", "seconds", "device")})
    budget = int(args.budget_fraction * tokens.sum())
    raw = np.asarray(pool_ngrams.sum(axis=0)).ravel()
    kl_raw = kl_divergence(target_ngrams, raw)
    heldout = [r.get("text") or "" for r in task.heldout()]
    t = time.perf_counter()
    vocab = task_vocab(task)
    emit(stage="vocab", seconds=round(time.perf_counter() - t, 1), size=len(vocab))

    domain = list(task.meta["spec"]["values"])
    rows, ids_by_run, tokens_by_run = [], {}, {}
    for name in args.methods.split(","):
        for seed in (int(x) for x in args.select_seeds.split(",")):
            s = build_settings(overrides={**base, "select": {"budget_tokens": budget, **METHODS[name]}})
            sampler.reset()
            t = time.perf_counter()
            ref = select.fn(s.select, docs, features, clusters, scores, seed)
            seconds = time.perf_counter() - t
            with connect(store, read_only=True) as con:
                sel = query_sql(con, "select_read_selected_docs", {"key": ref.key, "docs_key": docs.key}).pl()
                info = dict(query_sql(con, "select_read_info", {"key": ref.key}).fetchall())
            chosen = sel["doc_idx"].to_numpy()
            kl_sel = kl_divergence(target_ngrams, np.asarray(pool_ngrams[chosen].sum(axis=0)).ravel())
            quality = evaluate_selection(sel["text"].to_list(), heldout, vocab)
            run = f"{name}/{seed}"
            ids_by_run[run] = sel["source_id"].cast(str).to_list()
            tokens_by_run[run] = int(sel["n_tokens"].sum())
            in_domain = sel["source"].is_in(domain).to_numpy()
            row = {"method": name, "seed": seed, "docs": sel.height, "tokens": tokens_by_run[run], "budget": budget,
                   "kl_reduction": kl_raw - kl_sel, "perplexity": quality["perplexity"],
                   "domain_share": float(sel["n_tokens"].to_numpy()[in_domain].sum() / max(tokens_by_run[run], 1)),
                   "select_seconds": round(seconds, 2), "rounds": info.get("rounds"),
                   "docs_scored": info.get("docs_scored"), "probe_seconds": info.get("probe_seconds"),
                   "pool_docs": int(tokens.size)}
            rows.append(row)
            emit(stage="select", **row)
    check_protocol(ids_by_run, task.heldout_ids(), tokens_by_run, budget)
    sampler.stop()

    print(f"\n{task.name}: pool {kept:,} docs / {int(tokens.sum()):,} tokens, budget {budget:,} tokens, pipeline "
          f"seed {args.seed}, select seeds {args.select_seeds}, {platform.node()} ({os.cpu_count()} CPUs)\n")
    print("| method | runs | docs | KL reduction | held-out perplexity | in-domain tokens "
          "| docs scored by the probe scorer | select time |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.methods.split(","):
        rs = [r for r in rows if r["method"] == name]

        def stat(key, fmt):
            v = np.array([float(r[key]) for r in rs])
            return f"{v.mean():{fmt}}" + (f" +- {v.std(ddof=1):{fmt}}" if v.size > 1 else "")

        scored = "" if rs[0]["docs_scored"] is None else (
            f"{stat('docs_scored', ',.0f')} of {rs[0]['pool_docs']:,} ({stat('probe_seconds', '.1f')} s)")
        print(f"| {name} | {len(rs)} | {stat('docs', ',.0f')} | {stat('kl_reduction', '.4f')} | "
              f"{stat('perplexity', ',.1f')} | {stat('domain_share', '.1%')} | {scored} | {stat('select_seconds', '.1f')} s |")


if __name__ == "__main__":
    main()
