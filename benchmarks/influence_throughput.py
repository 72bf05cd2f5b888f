"""Throughput of the influence scorer on real documents: python -m benchmarks.influence_throughput POOL.jsonl[.zst|.gz]

Trains the proxy on a seeded sample, fits each method on reference / fit documents and times
scoring random pool documents (what Quad's probes are). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import resource
import time

import numpy as np


def _lines(path: str):
    with open(path, "rb") as raw:
        if path.endswith(".zst"):
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(raw)
        elif path.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=raw)
        else:
            stream = raw
        yield from io.TextIOWrapper(stream, encoding="utf-8")


def sample_pool(path: str, n: int, seed: int, ref_source: str, ref_docs: int) -> tuple[list[str], list[str]]:
    """n texts drawn uniformly (seeded) from a JSONL(.zst) pool, and up to ref_docs texts of one source."""
    total = sum(1 for _ in _lines(path))
    keep = set(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False).tolist())
    picked, ref = {}, []
    for i, line in enumerate(_lines(path)):
        if i in keep or len(ref) < ref_docs:
            row = json.loads(line)
            if i in keep:
                picked[i] = row["text"]
            if row.get("source") == ref_source and len(ref) < ref_docs:
                ref.append(row["text"])
    order = np.random.default_rng(seed + 1).permutation(sorted(picked))
    return [picked[int(i)] for i in order], ref


def main(argv: list[str] | None = None) -> None:
    import torch

    from . import InfluenceScorer, ProxyConfig, train_proxy
    from .proxy import n_params

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pool")
    ap.add_argument("--sample", type=int, default=20000, help="pool documents drawn (fit + score + training)")
    ap.add_argument("--score-docs", type=int, default=2000)
    ap.add_argument("--fit-docs", type=int, default=1000)
    ap.add_argument("--ref-source", default="python3.11-doc", help="pool source used as the reference set")
    ap.add_argument("--ref-docs", type=int, default=200)
    ap.add_argument("--methods", default="ekfac,kfac,cosine")
    ap.add_argument("--proj-dim", type=int, default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-chunks", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--tokenizer", default="bytes")
    ap.add_argument("--device", default=None, help="where to train and score (default: cuda if available)")
    ap.add_argument("--score-device", default=None, help="score somewhere else than where the proxy trained")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t = time.monotonic()
    texts, ref = sample_pool(args.pool, args.sample, args.seed, args.ref_source, args.ref_docs)
    fit = texts[: args.fit_docs]
    probe = texts[args.fit_docs : args.fit_docs + args.score_docs]
    train = texts[args.fit_docs + args.score_docs :]
    print(json.dumps({"stage": "read", "seconds": round(time.monotonic() - t, 1), "sampled": len(texts)}))

    def emit(**kw):
        kw["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(kw), flush=True)

    cfg = ProxyConfig(
        n_layers=args.layers, d_model=args.d_model, n_heads=max(1, args.d_model // 32),
        seq_len=args.seq_len, steps=args.steps, tokenizer=args.tokenizer,
    )
    t = time.monotonic()
    model = train_proxy(train, cfg, seed=args.seed, device=args.device)
    device = args.score_device or str(next(model.parameters()).device)
    emit(stage="train", seconds=round(time.monotonic() - t, 1), params=n_params(model),
         device=str(next(model.parameters()).device),
         threads=torch.get_num_threads(), loss=round(model.train_loss_, 3), config=cfg.__dict__)
    probe_chars = np.array([len(x) for x in probe])
    for method in args.methods.split(","):
        scorer = InfluenceScorer(model, method=method, proj_dim=args.proj_dim, max_chunks=args.max_chunks,
                                 batch_tokens=args.batch_tokens, device=device, random_state=args.seed)
        t = time.monotonic()
        scorer.fit(ref, fit)
        fit_s = time.monotonic() - t
        t = time.monotonic()
        scores = scorer.score(probe)
        score_s = time.monotonic() - t
        emit(stage="score", method=method, fit_seconds=round(fit_s, 1), ref_docs=len(ref), fit_docs=len(fit),
             docs=len(probe), median_chars=int(np.median(probe_chars)), seconds=round(score_s, 1),
             docs_per_s=round(len(probe) / score_s, 1), finite=bool(np.isfinite(scores).all()))


if __name__ == "__main__":
    main()
