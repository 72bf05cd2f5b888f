"""Dedup benchmarks: precision/recall against a scale pool's planted duplicates, throughput against datatrove's MinHash
pipeline, peak RSS, and the MinHash implementations side by side.

    # planted duplicates (benchmarks/make_scale_pool.py --truth), the first N documents of a pool in 100k-doc files
    # (--dedup '{...}' for other DedupSettings)
    python benchmarks/dedup.py quality --pool runs/scale-5m --truth runs/scale-5m/truth.parquet --docs 1000000 \
        --work runs/dedup-1m
    # quadflow's dedup stage and datatrove's four MinHash stages on the same documents, in one run
    # (--workers 1: datatrove in this process; --docs N: the pool's first N documents)
    python benchmarks/dedup.py throughput --input ../shared/data/debian-pool-v1.jsonl.zst --work runs/dedup-tp
    # MinHash signatures only: this repo's numpy code, rensa, datasketch (when installed) on the same shingles
    python benchmarks/dedup.py libraries --input ../shared/data/debian-pool-v1.jsonl.zst --docs 20000

`quality` ingests the pool into a fresh store in a child process, then runs the dedup stage's task
function in this process (shards one after another, as a flow with one worker would) and records
its wall time, CPU time and the process's peak RSS while it ran (benchmarks/stages.py's sampler),
so the RSS is the stage's, not ingest's. It then scores the dropped documents against the ground
truth: a planted near duplicate (one edit away from the document it copies) is found when it is in
the same component as that document (after exact dedup, a copy is represented by the kept
document with its text). A dropped document is classified by how it relates to the document kept
for its component: the same planted family (same perturbed root), the same source document
perturbed independently (both derive from one source text with 2-5% of words edited each), source
documents that are near duplicates in the source pool itself (exact Jaccard similarity >= 0.8 of the
two source texts' word 3-gram sets, e.g. one man page shipped by two packages), or none of these (a
false positive).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
FILE_DOCS = 100_000
SOURCE_JACCARD = 0.8  # exact word 3-gram Jaccard similarity of two source texts above which they count as one document


def _cpu() -> float:
    """CPU seconds of this process (every thread) and its finished children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class TreeCPU:
    """CPU seconds of this process and every descendant, sampled (psutil) while a block runs.

    getrusage misses datatrove's workers: they are children of multiprocess's fork server, which
    is not waited for. A descendant's last sample counts, so one that exits between samples loses
    at most `every` seconds of its CPU time.
    """

    def __init__(self, every: float = 0.2):
        self.every = every

    def __enter__(self) -> "TreeCPU":
        import threading

        import psutil

        self._me = psutil.Process()
        self._seen: dict[int, float] = {}
        self._start = sum(self._me.cpu_times()[:2])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        import psutil

        for child in self._me.children(recursive=True):
            try:
                t = child.cpu_times()
                self._seen[(child.pid, child.create_time())] = t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __exit__(self, *exc) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()
        self.seconds = sum(self._me.cpu_times()[:2]) - self._start + sum(self._seen.values())


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _ingest(inputs: list[str], store_path: Path) -> None:
    """Ingest the inputs into a fresh store (run in a child process: its memory is not the dedup stage's)."""
    from quadflow.settings import IngestSettings
    from quadflow.store import open_store
    from quadflow.tasks.ingest import expand_inputs, fingerprint_files, ingest

    for p in store_path.parent.glob(f"{store_path.name}*"):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    files = fingerprint_files(expand_inputs(inputs))
    t0 = time.perf_counter()
    ingest.fn(IngestSettings(inputs=inputs), files, (), open_store(store_path))
    print(json.dumps({"ingest_seconds": round(time.perf_counter() - t0, 1)}), flush=True)


def _child_ingest(inputs: list[str], store_path: Path) -> float:
    out = subprocess.run([sys.executable, __file__, "_ingest", str(store_path), *inputs], check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.stdout.strip().splitlines()[-1])["ingest_seconds"]


def run_dedup_stage(store_path: Path, settings=None, shard_docs: int = 50_000) -> dict:
    """The dedup task function on an ingested store: its ref, wall and CPU seconds, peak RSS while it ran."""
    from benchmarks.stages import PeakRSS
    from quadflow.settings import DedupSettings, RunSettings
    from quadflow.store import connect, make_ref, open_store
    from quadflow.tasks.dedup import dedup

    store = open_store(store_path)
    with connect(store) as con:
        key = con.execute("select key from ingest_runs order by created_at desc limit 1").fetchone()[0]
        docs = make_ref(con, "ingest", key, store, "ingest_docs", ["role", "doc_idx", "doc_id"])
    sampler = PeakRSS()
    sampler.reset()
    start_rss = sampler.peak
    cpu0, t0 = _cpu(), time.perf_counter()
    ref = dedup.fn(settings or DedupSettings(), docs, 0, RunSettings(shard_docs=shard_docs))
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    sampler.stop()
    return {"ref": ref, "docs_key": key, "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
            "start_rss_mb": round(start_rss), "peak_rss_mb": round(sampler.peak), "load": _load()}


# ---------------------------------------------------------------------------------------------
# quality: precision and recall against the generator's ground truth
# ---------------------------------------------------------------------------------------------


def _positions(con, docs_key: str, first_doc: dict[str, int]) -> pl.DataFrame:
    """position -> doc_idx of the ingest document holding its text (its own, or the kept exact duplicate's)."""
    kept = con.execute("select doc_idx, doc_id, file, line from ingest_docs where key = ? and role = 'pool'",
                       [docs_key]).pl()
    dups = con.execute("select doc_id, file, line from ingest_duplicates where key = ? and role = 'pool'",
                       [docs_key]).pl()
    rows = pl.concat([kept.select("doc_id", "file", "line"), dups.select("doc_id", "file", "line")])
    base = pl.Series([first_doc[Path(f).name] for f in rows["file"]], dtype=pl.Int64)
    rows = rows.with_columns(position=base + pl.col("line") - 1)
    return rows.join(kept.select("doc_id", "doc_idx"), on="doc_id").select("position", "doc_idx").sort("position")


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i:i + 3]) for i in range(max(len(words) - 2, 1))}


def score_against_truth(con, docs_key: str, dedup_key: str, truth: pl.DataFrame, first_doc: dict[str, int],
                        source_texts: list[str] | None) -> dict:
    """Recall of the planted near duplicates and the dropped documents by relation to their kept document."""
    from quadflow.text import normalize

    pos = _positions(con, docs_key, first_doc)
    n = int(truth["position"].max()) + 1
    doc_of = np.full(n, -1, dtype=np.int64)
    doc_of[pos["position"].to_numpy()] = pos["doc_idx"].to_numpy()
    n_docs = con.execute("select count(*) from ingest_docs where key = ? and role = 'pool'", [docs_key]).fetchone()[0]
    drops = con.execute("select doc_idx, representative from dedup_duplicates where key = ?", [dedup_key]).pl()
    kept_as = np.arange(n_docs, dtype=np.int64)  # doc_idx -> the document its component keeps
    kept_as[drops["doc_idx"].to_numpy()] = drops["representative"].to_numpy()
    words = con.execute("select doc_idx, n_words from dedup_buckets where key = ?", [dedup_key]).pl().sort("doc_idx")
    n_words = np.zeros(n_docs, dtype=np.int64)
    n_words[words["doc_idx"].to_numpy()] = words["n_words"].to_numpy()

    t = truth.sort("position")
    kind, target = t["kind"].to_numpy(), t["target"].to_numpy()
    root, source = t["root"].to_numpy(), t["source"].to_numpy()
    near = np.flatnonzero(kind == "near_duplicate")
    d_copy, d_orig = doc_of[near], doc_of[target[near]]
    distinct = d_copy != d_orig  # an edit undone by normalization made an exact duplicate: ingest's job
    found = kept_as[d_copy[distinct]] == kept_as[d_orig[distinct]]
    w = n_words[d_copy[distinct]]
    by_len = {}
    for lo, hi in ((0, 3), (3, 10), (10, 20), (20, 50), (50, 200), (200, 10**9)):
        m = (w >= lo) & (w < hi)
        by_len[f"{lo}-{hi - 1 if hi < 10**9 else ''}"] = {"planted": int(m.sum()),
                                                            "recall": round(float(found[m].mean()), 4) if m.any() else None}

    # the position of each dropped document and of its kept document (any position holding that text)
    pos_of_doc = np.full(n_docs, -1, dtype=np.int64)
    pd_ = pos.unique("doc_idx", keep="first")
    pos_of_doc[pd_["doc_idx"].to_numpy()] = pd_["position"].to_numpy()
    dropped, rep = drops["doc_idx"].to_numpy(), drops["representative"].to_numpy()
    pa_, pb_ = pos_of_doc[dropped], pos_of_doc[rep]
    family = root[pa_] == root[pb_]
    same_source = ~family & (source[root[pa_]] == source[root[pb_]])
    rest = np.flatnonzero(~family & ~same_source)
    near_source = np.zeros(dropped.size, dtype=bool)
    if source_texts is not None:
        for i in rest:
            a, b = (_trigrams(normalize(source_texts[source[root[p]]])) for p in (pa_[i], pb_[i]))
            near_source[i] = len(a & b) >= SOURCE_JACCARD * max(len(a | b), 1)
    other = ~family & ~same_source & ~near_source
    total = max(int(dropped.size), 1)
    return {
        "pool_docs_after_exact_dedup": int(n_docs),
        "planted_near_duplicates": int(near.size),
        "planted_distinct_after_exact_dedup": int(distinct.sum()),
        "recall": round(float(found.mean()), 4),
        "recall_by_words": by_len,
        "dropped": int(dropped.size),
        "dropped_same_planted_family": int(family.sum()),
        "dropped_same_source_document": int(same_source.sum()),
        "dropped_near_duplicate_sources": int(near_source.sum()),
        "dropped_other": int(other.sum()),
        "precision_planted_family": round(float(family.sum() / total), 4),
        "precision_same_source": round(float((family | same_source).sum() / total), 4),
        "precision": round(float((~other).sum() / total), 4),
        "other_examples": [(int(dropped[i]), int(rep[i])) for i in np.flatnonzero(other)[:20]],
    }


def quality(args) -> dict:
    from benchmarks.make_scale_pool import load_source
    from quadflow.settings import DedupSettings
    from quadflow.store import connect, open_store

    manifest = json.loads((Path(args.pool) / "MANIFEST.json").read_text())
    per_file = manifest["params"]["docs_per_file"]
    files = sorted(Path(args.pool).glob("part-*.jsonl.zst"))[: -(-args.docs // per_file)]
    first_doc = {e["name"]: e["first_doc"] for e in manifest["files"]}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store_path = work / "quadflow.duckdb"
    out: dict = {"docs": args.docs, "files": len(files), "load_before": _load()}
    if args.reuse_store and store_path.exists():
        out["ingest_seconds"] = None
    else:
        out["ingest_seconds"] = _child_ingest([str(f) for f in files], store_path)
    settings = DedupSettings.model_validate(json.loads(args.dedup or "{}"))
    out["settings"] = settings.model_dump()
    stage = run_dedup_stage(store_path, settings, shard_docs=args.shard_docs)
    ref = stage.pop("ref")
    out.update(stage, dedup_key=ref.key)
    print(json.dumps({k: v for k, v in out.items()}), flush=True)
    truth = pl.read_parquet(args.truth).filter(pl.col("position") < args.docs)
    source = load_source(manifest["source"]["path"]).texts if Path(manifest["source"]["path"]).exists() else None
    with connect(open_store(store_path), read_only=True) as con:
        info = dict(con.execute("select name, value from dedup_info where key = ?", [ref.key]).fetchall())
        out["dedup_info"] = {k: json.loads(v) for k, v in info.items()}
        out["quality"] = score_against_truth(con, stage["docs_key"], ref.key, truth, first_doc, source)
    return out


# ---------------------------------------------------------------------------------------------
# throughput: quadflow's dedup stage vs datatrove's MinHash pipeline, same documents, one run
# ---------------------------------------------------------------------------------------------


def _datatrove_minhash(data_dir: Path, work: Path, workers: int) -> dict:
    """datatrove's four MinHash stages (signatures, buckets, clusters, filter) with FineWeb's MinhashConfig defaults
    (word 5-grams, 14 buckets x 8 hashes), as its examples/minhash_deduplication.py runs them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from importlib.metadata import version

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    config = MinhashConfig()
    files = sorted(data_dir.glob("*.jsonl"))
    read = lambda: JsonlReader(str(data_dir), glob_pattern="*.jsonl", text_key="text", id_key="id")  # noqa: E731
    stages = {
        "signatures": LocalPipelineExecutor(pipeline=[read(), MinhashDedupSignature(str(work / "sigs"), config=config)],
                                            tasks=len(files), workers=workers, logging_dir=str(work / "logs1")),
        "buckets": LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"),
                                                                       config=config)],
                                         tasks=config.num_buckets, workers=workers, logging_dir=str(work / "logs2")),
        "clusters": LocalPipelineExecutor(pipeline=[MinhashDedupCluster(str(work / "buckets"), str(work / "remove"),
                                                                        config=config)],
                                          tasks=1, workers=1, logging_dir=str(work / "logs3")),
        "filter": LocalPipelineExecutor(pipeline=[read(), MinhashDedupFilter(str(work / "remove")),
                                                  JsonlWriter(str(work / "kept"))],
                                        tasks=len(files), workers=workers, logging_dir=str(work / "logs4")),
    }
    out = {"version": version("datatrove"), "stages": {}}
    for name, executor in stages.items():
        t0 = time.perf_counter()
        with TreeCPU() as cpu:
            executor.run()
        out["stages"][name] = {"seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(cpu.seconds, 1)}
    stats = json.loads((work / "logs4" / "stats.json").read_text())
    dropped = [s for s in stats if "MinHash stage 4" in s.get("name", "")]
    out["dropped"] = int(dropped[0]["stats"].get("dropped", 0)) if dropped else None
    return out


def _keep_first(store_path: Path, docs: int) -> None:
    """Cut the ingested pool to its first `docs` documents (doc_idx stays dense)."""
    import duckdb

    with duckdb.connect(str(store_path)) as con:
        con.execute("delete from ingest_docs where role = 'pool' and doc_idx >= ?", [docs])


def throughput(args) -> dict:
    from benchmarks.datatrove_ref import shard_jsonl
    from quadflow.store import connect, open_store

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store_path = work / "quadflow.duckdb"
    out: dict = {"input": args.input, "workers": args.workers, "load_before": _load()}
    out["ingest_seconds"] = _child_ingest([args.input], store_path)
    if args.docs:  # the first N documents of the pool: a store holding only those, so both tools see the same
        _keep_first(store_path, args.docs)
    with connect(open_store(store_path), read_only=True) as con:
        key = con.execute("select key from ingest_runs order by created_at desc limit 1").fetchone()[0]
        rows = con.execute("select doc_idx, text from ingest_docs where key = ? and role = 'pool' order by doc_idx "
                           "limit ?", [key, args.docs or 2**62]).fetchall()
    docs = len(rows)
    with tempfile.TemporaryDirectory(prefix="dedup-bench-", dir=work) as tmp:  # the same documents for datatrove
        data = Path(tmp) / "data"
        shard_jsonl((json.dumps({"id": str(i), "text": t}) for i, t in rows), data, args.workers)
        del rows
        stage = run_dedup_stage(store_path, shard_docs=args.shard_docs)
        ref = stage.pop("ref")
        out["quadflow"] = {**stage, "dropped": ref.rows, "docs_per_cpu_second": round(docs / stage["cpu_seconds"])}
        print(json.dumps(out), flush=True)
        dt = _datatrove_minhash(data, Path(tmp), args.workers)
    cpu = sum(s["cpu_seconds"] for n, s in dt["stages"].items() if n != "filter")
    wall = sum(s["seconds"] for n, s in dt["stages"].items() if n != "filter")
    dt.update(docs_per_cpu_second=round(docs / cpu), seconds_find=round(wall, 1), cpu_seconds_find=round(cpu, 1),
              load=_load())
    out.update(docs=docs, datatrove=dt,
               per_core_ratio=round(out["quadflow"]["docs_per_cpu_second"] / dt["docs_per_cpu_second"], 2))
    return out


# ---------------------------------------------------------------------------------------------
# libraries: MinHash signatures from the same shingles
# ---------------------------------------------------------------------------------------------


def _numpy_block_minhash(doc, shingles, n_docs, a, b, chunk=1 << 15):
    """The (shingles x permutations) block formulation of the same hash family (the first version, 2.6x slower)."""
    sig = np.full((n_docs, a.size), np.iinfo(np.uint32).max, dtype=np.uint32)
    x = (shingles >> np.uint64(32)) ^ (shingles & np.uint64(0xFFFFFFFF))
    for lo in range(0, x.size, chunk):
        d = doc[lo:lo + chunk]
        v = ((x[lo:lo + chunk, None] * a + b) >> np.uint64(32)).astype(np.uint32)
        starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
        sig[d[starts]] = np.minimum(sig[d[starts]], np.minimum.reduceat(v, starts, axis=0))
    return sig


def libraries(args) -> dict:
    import duckdb

    from quadflow.tasks import dedup as dd

    texts = duckdb.sql(f"select text from read_json('{args.input}', compression='zstd') "
                       f"using sample {int(args.docs)} (reservoir, 1)").pl()["text"]
    doc, h, n_words = dd.word_hashes(texts)
    keep = n_words >= 1
    d, s = dd.shingle_hashes(dd._dense(doc[keep[doc]], keep), h[keep[doc]], n_words[keep],
                             dd.shingle_sizes(n_words[keep], 5, 10))
    n = int(keep.sum())
    a, b = dd.minhash_params(112, 0)
    out: dict = {"docs": n, "shingles": int(s.size), "load": _load()}

    def timed(name, fn):
        t0 = time.process_time()
        fn()
        out[name] = {"cpu_seconds": round(time.process_time() - t0, 3)}
        out[name]["docs_per_cpu_second"] = round(n / max(out[name]["cpu_seconds"], 1e-9))

    timed("quadflow numpy (one permutation at a time)", lambda: dd.minhash_signatures(d, s, n, a, b))
    timed("numpy block (shingles x permutations)", lambda: _numpy_block_minhash(d, s, n, a, b))
    offsets = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum(np.bincount(d, minlength=n), out=offsets[1:])
    try:
        import rensa

        timed("rensa 0.5 digest matrix (Rust), signatures left in Rust",
              lambda: rensa.RMinHash.digest_matrix_from_flat_token_hashes(s, offsets, 112, 0))
        timed("rensa 0.5 digest matrix, signatures to numpy (to_rows)",
              lambda: np.asarray(rensa.RMinHash.digest_matrix_from_flat_token_hashes(s, offsets, 112, 0).to_rows(),
                                 dtype=np.uint32))
    except ImportError:
        out["rensa"] = "not installed"
    try:
        from datasketch import MinHash

        sub = min(n, 2000)  # datasketch is per document in Python: a sample, scaled in docs_per_cpu_second

        def ds():
            for i in range(sub):
                m = MinHash(num_perm=112, seed=1)
                m.update_batch([int(x).to_bytes(8, "little") for x in s[offsets[i]:offsets[i + 1]]])

        t0 = time.process_time()
        ds()
        cpu = time.process_time() - t0
        out["datasketch 2.0 (per document, a sample)"] = {"docs": sub, "cpu_seconds": round(cpu, 3),
                                                          "docs_per_cpu_second": round(sub / cpu)}
    except ImportError:
        out["datasketch"] = "not installed"
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_ingest":
        return _ingest(argv[2:], Path(argv[1]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--pool", required=True, help="a make_scale_pool.py output directory")
    q.add_argument("--truth", required=True, help="its --truth Parquet file")
    q.add_argument("--docs", type=int, required=True, help="the first N documents (a multiple of the file size)")
    q.add_argument("--work", required=True)
    q.add_argument("--shard-docs", type=int, default=50_000)
    q.add_argument("--reuse-store", action="store_true", help="skip ingest when the work store exists")
    q.add_argument("--dedup", help='DedupSettings as JSON, e.g. FineWeb\'s 5-grams on every document: '
                   '\'{"words_per_shingle_word": 1, "short_words": 0, "min_words": 1}\'')
    t = sub.add_parser("throughput")
    t.add_argument("--input", required=True)
    t.add_argument("--work", required=True)
    t.add_argument("--workers", type=int, default=2, help="datatrove's worker processes")
    t.add_argument("--shard-docs", type=int, default=50_000)
    t.add_argument("--docs", type=int, help="only the first N documents of the pool (default: all)")
    lib = sub.add_parser("libraries")
    lib.add_argument("--input", required=True)
    lib.add_argument("--docs", type=int, default=20_000)
    for p in (q, t, lib):
        p.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    result = {"quality": quality, "throughput": throughput, "libraries": libraries}[args.cmd](args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
