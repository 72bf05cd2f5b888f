"""Read and write throughput of quadflow.objectstore against an S3 endpoint (default: a local moto server).

    .venv/bin/python benchmarks/objectstore_throughput.py --mb 64 --repeat 3

Without --endpoint it starts `python -m moto.server` on a free loopback port in its own process
(so the server does not share this process's GIL) with throwaway credentials. With --endpoint
it uses that store and the standard AWS credential chain, and writes under --bucket.
Reports MB/s (1 MB = 2**20 bytes) for a single-PUT upload, a multipart upload and a streaming
read, the best of --repeat runs, plus this process's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO))

from benchmarks.prefect_server import free_port  # noqa: E402
from quadflow import objectstore as ob  # noqa: E402

MiB = 1024 * 1024


@contextmanager
def moto_process() -> Iterator[str]:
    """A moto S3 server in a child process; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto server on port {port} did not start") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_all(c: ob.ObjectStoreClient, url: str, chunk: int) -> int:
    n = 0
    with ob.open_read(c, url) as f:
        while block := f.read(chunk):
            n += len(block)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=64, help="object size in MiB")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is reported")
    ap.add_argument("--part-mb", type=int, default=8, help="multipart part size in MiB")
    ap.add_argument("--concurrency", type=int, default=4, help="threads per multipart upload")
    ap.add_argument("--read-chunk-kb", type=int, default=1024, help="bytes asked per read() call, KiB")
    ap.add_argument("--endpoint", help="use this S3 endpoint instead of a local moto server")
    ap.add_argument("--bucket", help="bucket to write to (created when using the local moto server)")
    args = ap.parse_args()
    if args.endpoint and not args.bucket:
        ap.error("--endpoint needs --bucket (an existing bucket the credentials may write to)")

    server = moto_process() if not args.endpoint else _given(args.endpoint)
    with tempfile.TemporaryDirectory() as tmp, server as endpoint:
        if not args.endpoint:  # throwaway credentials for the throwaway server
            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret",
                              AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
        size = args.mb * MiB
        path = Path(tmp) / "blob.bin"
        with open(path, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(MiB))
        base = ob.ObjectStoreSettings(endpoint_url=endpoint, region="us-east-1", addressing_style="path")
        single = ob.client(base.model_copy(update={"multipart_threshold": size + 1}))
        multi = ob.client(base.model_copy(update={"multipart_threshold": args.part_mb * MiB,
                                                  "multipart_chunksize": args.part_mb * MiB,
                                                  "max_concurrency": args.concurrency}))
        bucket = args.bucket or f"qf-bench-{uuid.uuid4().hex[:8]}"
        if not args.endpoint:
            single.s3.create_bucket(Bucket=bucket)
        url_single, url_multi = f"s3://{bucket}/bench/single.bin", f"s3://{bucket}/bench/multi.bin"

        results: dict[str, float] = {}
        results["write, single PUT"] = min(timed(lambda: ob.upload_file(single, path, url_single))
                                           for _ in range(args.repeat))
        results[f"write, multipart ({args.part_mb} MiB parts x {args.concurrency} threads)"] = min(
            timed(lambda: ob.upload_file(multi, path, url_multi)) for _ in range(args.repeat))
        chunk = args.read_chunk_kb * 1024
        assert read_all(single, url_single, chunk) == size
        results[f"read, one stream ({args.read_chunk_kb} KiB reads)"] = min(
            timed(lambda: read_all(single, url_single, chunk)) for _ in range(args.repeat))
        for url in (url_single, url_multi):
            ob.delete(single, url)

    print(f"object: {args.mb} MiB, endpoint: {'local moto server (child process)' if not args.endpoint else endpoint}, "
          f"best of {args.repeat}")
    for name, seconds in results.items():
        print(f"  {name:<48} {args.mb / seconds:8.1f} MB/s  ({seconds:.2f} s)")
    retries = single.counters.retries + multi.counters.retries
    print(f"  retries: {retries}; peak RSS of this process: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


@contextmanager
def _given(endpoint: str) -> Iterator[str]:
    yield endpoint


if __name__ == "__main__":
    main()
