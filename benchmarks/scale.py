"""Scale benchmark: time and peak RSS per stage against pool size, and documents/s with 1, 2, ... workers.

    # a 5M-document pool in 100k-document files (see make_scale_pool.py)
    python benchmarks/make_scale_pool.py ../shared/data/debian-pool-v1.jsonl.zst runs/scale-pool \
        --docs 5000000 --docs-per-file 100000
    python benchmarks/scale.py --pool runs/scale-pool --sizes 100000,1000000,5000000 --out runs/scale
    python benchmarks/scale.py --pool runs/scale-pool --workers-at 1000000 --out runs/scale
    python benchmarks/scale.py --pool runs/scale-pool --workers-at 200000 --workers 1,2,4 \
        --runners processes,dask,ray --shard-docs 25000 --out runs/scale-runners
    python benchmarks/scale.py --pool runs/scale-pool --workers-at 200000 --workers 2 \
        --shard-docs 25000 --parts local,s3 --out runs/scale-parts

A pool of N documents is the first N / 100k files of the generated pool (a smaller pool is a
prefix of a larger one). `--sizes` runs every stage in one fresh process per size
(benchmarks/stages.py: each stage's task function, shards one after another in that process) and
records each stage's wall time and the process's peak RSS while it ran. `--workers-at N` runs the
whole flow (`quadflow run`) with each of `--workers` (default 1,2) on each of `--runners`
(default: processes, a local process pool; dask: a local Dask cluster of that many worker
processes; ray: a local Ray instance with that many CPUs), on fresh stores, and reports
end-to-end and per-stage documents/s. Those runs report to one Prefect server the benchmark
starts on loopback, as Dask and Ray workers need. `--parts local,s3` runs each of them with its
shard parts in `<store>.parts` and again under an s3:// prefix on moto's S3 server, started on
loopback (needs the test extra), so no shard part touches a shared directory. Every run records
how many documents it selected and a digest of their ids, to show the selection does not depend
on where it ran. Results go to `<out>/scale.json` and are printed as markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import yaml

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO))

from benchmarks.prefect_server import prefect_server  # noqa: E402

TARGET = REPO / "examples" / "data" / "target.jsonl.zst"
FILE_DOCS = 100_000


def _config(pool: Path, size: int, work: Path, shard_docs: int) -> Path:
    files = sorted(pool.glob("part-*.jsonl.zst"))
    need = -(-size // FILE_DOCS)
    if len(files) < need:
        raise SystemExit(f"{pool} holds {len(files)} files of {FILE_DOCS:,} documents; {size:,} needs {need}")
    work.mkdir(parents=True, exist_ok=True)
    cfg = {
        "store": str(work / "quadflow.duckdb"),
        "seed": 0,
        "ingest": {"inputs": [str(f) for f in files[:need]], "targets": [str(TARGET)]},
        "score": {"scorers": ["heuristic", "dsir", "classifier"]},
        "select": {"selector": "quad", "budget_tokens": 5_000_000},
        "export": {"output": str(work / "out")},
        "run": {"shard_docs": shard_docs},
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fresh(work: Path) -> None:
    for p in work.glob("quadflow.duckdb*"):
        subprocess.run(["rm", "-rf", str(p)], check=True)


def stage_profile(pool: Path, size: int, out: Path, shard_docs: int) -> dict:
    work = out / f"stages-{size}"
    _fresh(work)
    cfg = _config(pool, size, work, shard_docs)
    result = work / "stages.json"
    cmd = ["/usr/bin/time", "-v", sys.executable, str(REPO / "benchmarks" / "stages.py"), "--config", str(cfg),
           "--json", str(result)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"stages.py failed at {size:,} docs:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    rows = json.loads(result.read_text())
    # the DuckDB file and the parts its views read (<store>.data)
    store_mb = sum(f.stat().st_size for f in [work / "quadflow.duckdb", *work.glob("quadflow.duckdb.data/**/*")]
                   if f.is_file()) / 2**20
    return {"docs": size, "wall_s": round(wall, 1), "peak_rss_mb": round(peak), "store_mb": round(store_mb),
            "stages": [r for r in rows if "seconds" in r]}


def workers_profile(pool: Path, size: int, out: Path, shard_docs: int, workers: int, runner: str = "processes",
                    api_url: str | None = None, s3: dict | None = None) -> dict:
    name = f"workers-{size}-{workers}" if runner == "processes" else f"workers-{size}-{runner}-{workers}"
    work = out / (name + ("-s3parts" if s3 else ""))
    _fresh(work)
    cfg = _config(pool, size, work, shard_docs)
    log = work / "run.log"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # ray: a local instance with `workers` CPUs
    if api_url:
        env["PREFECT_API_URL"] = api_url
    cmd = ["/usr/bin/time", "-v", str(Path(sys.executable).parent / "quadflow"), "run", "--config", str(cfg),
           "--workers", str(workers), "--runner", runner]
    if s3:
        env.update(s3["env"])
        cmd += ["--parts", f"{s3['prefix']}/{work.name}"]
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"quadflow run failed ({runner}, {workers} workers):\n{text[-3000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024
    stage = {m.group(1): float(m.group(2)) for m in re.finditer(r"(featurize|score): [\d,]+/[\d,]+ docs \(100%\).*?"
                                                               r"done in ([\d.]+)s", text)}
    ids = sorted(pl.read_parquet(work / "out" / "selection.parquet", columns=["id"])["id"].to_list())
    cpu = re.search(r"flow process CPU: ([\d.]+) s in all; by stage: (.*)", text)
    flow_cpu = {m.group(1): float(m.group(2)) for m in re.finditer(r"(\w+) ([\d.]+) s", cpu.group(2))} if cpu else {}
    rss = re.search(r"flow process peak RSS: [\d,]+ MB; the high-water mark once each stage is done: (.*)", text)
    flow_rss = ({m.group(1): int(m.group(2).replace(",", "")) for m in re.finditer(r"(\w+) ([\d,]+) MB", rss.group(1))}
                if rss else {})
    return {"docs": size, "runner": runner, "workers": workers, "parts": "s3" if s3 else "local",
            "wall_s": round(wall, 1), "docs_per_s": round(size / wall), "peak_rss_mb_main": round(peak),
            "featurize_s": stage.get("featurize"), "score_s": stage.get("score"),
            "flow_cpu_s": float(cpu.group(1)) if cpu else None, "flow_cpu_by_stage_s": flow_cpu,
            "flow_peak_rss_mb_by_stage": flow_rss, "selected_docs": len(ids),
            "selection_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]}


@contextlib.contextmanager
def s3_parts_server():
    """moto's S3 server on a free loopback port with one bucket; the --parts prefix and the runs' environment."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket="scale-parts")
        yield {"prefix": "s3://scale-parts/parts", "env": env}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=Path, required=True, help="directory of make_scale_pool.py output")
    ap.add_argument("--sizes", default="", help="comma-separated pool sizes (multiples of 100,000)")
    ap.add_argument("--workers-at", type=int, help="pool size for the runs with each number of workers")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts for --workers-at")
    ap.add_argument("--runners", default="processes", help="comma-separated: processes, dask, ray")
    ap.add_argument("--parts", default="local", help="comma-separated: local, s3 (moto's server on loopback)")
    ap.add_argument("--shard-docs", type=int, default=50_000)
    ap.add_argument("--out", type=Path, default=Path("runs/scale"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    record = args.out / "scale.json"
    results = json.loads(record.read_text()) if record.exists() else {"stages": [], "workers": []}
    for size in [int(s) for s in args.sizes.split(",") if s]:
        r = stage_profile(args.pool, size, args.out, args.shard_docs)
        results["stages"] = [x for x in results["stages"] if x["docs"] != size] + [r]
        record.write_text(json.dumps(results, indent=2))
        print(f"{size:,} docs: {r['wall_s']} s, peak RSS {r['peak_rss_mb']} MB", flush=True)
    if args.workers_at:
        wheres = args.parts.split(",")
        with prefect_server(args.out) as server, (s3_parts_server() if "s3" in wheres
                                               else contextlib.nullcontext()) as s3:
            for runner in args.runners.split(","):
                for w in (int(x) for x in args.workers.split(",")):
                    for where in wheres:
                        r = workers_profile(args.pool, args.workers_at, args.out, args.shard_docs, w, runner, server.url,
                                            s3 if where == "s3" else None)
                        results["workers"] = [x for x in results["workers"] if _run_id(x) != _run_id(r)]
                        results["workers"].append(r)
                        record.write_text(json.dumps(results, indent=2))
                        print(json.dumps(r), flush=True)
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = []
    runs = sorted(results.get("stages", []), key=lambda r: r["docs"])
    if runs:
        stages = [s["stage"] for s in runs[0]["stages"]]
        lines.append("| pool docs | " + " | ".join(stages) + " | total | process peak RSS | store |")
        lines.append("|---|" + "---|" * (len(stages) + 3))
        for r in runs:
            by = {s["stage"]: s for s in r["stages"]}
            cells = [f"{by[s]['seconds']:.0f} s / {by[s]['peak_rss_mb'] / 1024:.2f} GB" if s in by else "" for s in stages]
            lines.append(f"| {r['docs']:,} | " + " | ".join(cells) + f" | {r['wall_s']:.0f} s | "
                         f"{r['peak_rss_mb'] / 1024:.2f} GB | {r['store_mb'] / 1024:.1f} GB |")
    if results.get("workers"):
        lines.append("")
        lines.append("| pool docs | runner | workers | parts | end to end | docs/s | featurize | score | "
                     "flow process CPU (per 1M docs) | flow process peak RSS | selected (ids digest) |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in sorted(results["workers"], key=_run_id):
            cpu = r.get("flow_cpu_s")
            cpu_cell = f"{cpu:.0f} s ({cpu / r['docs'] * 1e6:.0f} s)" if cpu is not None else ""
            lines.append(f"| {r['docs']:,} | {r.get('runner', 'processes')} | {r['workers']} | "
                         f"{r.get('parts', 'local')} | {r['wall_s']:.0f} s | {r['docs_per_s']:,} | {r['featurize_s']} s | "
                         f"{r['score_s']} s | {cpu_cell} | {r['peak_rss_mb_main'] / 1024:.2f} GB | "
                         f"{r.get('selected_docs', '')} ({r.get('selection_sha256', '')}) |")
    return "\n".join(lines)


def _run_id(r: dict) -> tuple:
    return r["docs"], r.get("runner", "processes"), r["workers"], r.get("parts", "local")


if __name__ == "__main__":
    main()
