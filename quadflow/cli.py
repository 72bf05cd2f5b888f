"""The `quadflow` command: run, demo, report, verify."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from quadflow.settings import SCORERS, SELECTORS, ConfigError, Settings, build_settings
from quadflow.shards import RUNNER_HELP

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "examples" / "demo.yaml"

EXIT_CONFIG = 2
EXIT_FAILED = 1
TEMPORARY_SERVER_WAIT_S = 120


class TemporaryServerError(RuntimeError):
    """Prefect's temporary server did not come up; the run exits 1 with what to do."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="quadflow",
        description="Select language-model training data within a token budget (Quad cluster bandit).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="curate a pool: ingest, featurize, cluster, score, select, export, report")
    run.add_argument("--config", help="YAML file with settings (flags override it)")
    run.add_argument("--input", action="append", dest="inputs", metavar="PATH",
                     help="pool file, directory, glob or s3://bucket/prefix (repeatable)")
    run.add_argument("--target", action="append", dest="targets", metavar="PATH",
                     help="target/reference file, directory, glob or s3:// URL (repeatable)")
    run.add_argument("--budget-tokens", type=int, help="token budget of the selection")
    run.add_argument("--store", help="DuckDB file for intermediate results (default quadflow.duckdb)")
    run.add_argument("--output", help="output directory or s3://bucket/prefix (default quadflow-output)")
    run.add_argument("--endpoint-url", metavar="URL",
                     help="S3-compatible endpoint for s3:// paths, e.g. http://127.0.0.1:9000 (default: AWS, "
                          "or AWS_ENDPOINT_URL); credentials come from the AWS chain")
    run.add_argument("--since", metavar="YYYY-MM-DD",
                     help="only pool inputs under date=YYYY-MM-DD/ partitions on or after this date")
    run.add_argument("--partition", action="append", dest="partitions", metavar="YYYY-MM-DD",
                     help="only pool inputs under this date=YYYY-MM-DD/ partition (repeatable)")
    run.add_argument("--full-ingest", action="store_true",
                     help="read every input again instead of reusing unchanged ones already in the store")
    run.add_argument("--no-dedup", action="store_true",
                     help="keep near duplicates (fuzzy dedup is on by default; exact duplicates are always dropped)")
    run.add_argument("--semantic-dedup", action="store_true",
                     help="also drop semantic duplicates inside each cluster (SemDeDup, off by default)")
    run.add_argument("--selector", choices=SELECTORS, help="quad (default), random, topk or dsir")
    run.add_argument("--scorer", action="append", dest="scorers", choices=SCORERS,
                     help="scorer (repeatable; combined by weighted mean percentile rank)")
    run.add_argument("--blocks", choices=("ranked", "random"),
                     help="quad's blocks: ranked (default, two-level Quad) or random (Quad as published)")
    run.add_argument("--probe-scorer", choices=("combined", *SCORERS),
                     help="score the bandit probes with (default: the rank score, the classifier when it ran; "
                          "influence scores only probed docs)")
    run.add_argument("--clusters", type=int, help="number of k-means clusters (default: about sqrt(pool size)); "
                     "clusters holding too many tokens are then split (cluster.balance)")
    run.add_argument("--seed", type=int, help="seed for every random step (default 0)")
    run.add_argument("--text-field", help="field holding the document text (default 'text')")
    run.add_argument("--format", choices=("parquet", "jsonl"), help="selection file format (default parquet)")
    run.add_argument("--overwrite", action="store_true", default=None,
                     help="publish into a non-empty directory quadflow did not create, or over another store's "
                          "output (refused otherwise)")
    run.add_argument("--runner", metavar="RUNNER", help=f"where shard tasks run: {RUNNER_HELP}")
    run.add_argument("--workers", type=int, help="worker processes/threads for the runner (default: one per core)")
    run.add_argument("--shard-docs", type=int,
                     help="documents per dedup/featurize/cluster/score shard (default 50,000; ingest's exact dedup "
                     "and dedup's candidate join take 8x as many documents' keys per hash range): sets peak "
                     "memory, not results")
    run.add_argument("--parts", metavar="DIR|s3://BUCKET/PREFIX",
                     help="where shard parts go: a directory the workers share, or an s3:// prefix (then workers "
                          "need no shared file system; endpoint from objectstore.*) (default: <store>.parts)")
    run.add_argument("--lock-timeout", default="3600", metavar="SECONDS",
                     help="how long to wait while another run holds the store (default 3600)")
    run.add_argument("--show-settings", action="store_true", help="print the resolved settings and exit")

    demo = sub.add_parser("demo", help="run on the shipped sample (examples/data) into ./demo-output")
    demo.add_argument("--output", default="demo-output", help="output directory (default demo-output)")

    rep = sub.add_parser("report", help="rebuild the report of the latest run in a store")
    rep.add_argument("--store", required=True, help="DuckDB store of the run")
    rep.add_argument("--output", help="directory to write report/ into (default: the run's output)")
    rep.add_argument("--lock-timeout", default="3600", metavar="SECONDS",
                     help="how long to wait while a run holds the store (default 3600)")

    ver = sub.add_parser("verify", help="check a published output (directory or s3:// prefix) against its manifest")
    ver.add_argument("output", help="output directory or s3://bucket/prefix")
    ver.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for an s3:// output")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "store": args.store,
        "seed": args.seed,
        "ingest": {"inputs": args.inputs, "targets": args.targets, "text_field": args.text_field,
                   "since": args.since, "partitions": args.partitions,
                   "incremental": False if args.full_ingest else None},
        "dedup": {"enabled": False if args.no_dedup else None, "semantic": True if args.semantic_dedup else None},
        "cluster": {"k": args.clusters},
        "score": {"scorers": args.scorers},
        "select": {"selector": args.selector, "budget_tokens": args.budget_tokens,
                   "probe_scorer": args.probe_scorer, "blocks": args.blocks},
        "export": {"output": args.output, "format": args.format, "overwrite": args.overwrite},
        "objectstore": {"endpoint_url": args.endpoint_url},
        "run": {"runner": args.runner, "workers": args.workers, "shard_docs": args.shard_docs, "parts": args.parts},
    }


def _prepare_environment() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@contextmanager
def _prefect_api() -> Iterator[None]:
    """Without a configured Prefect API, start the temporary server here and export its URL, so shard tasks
    in worker processes report to the same server instead of each starting their own."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    # Prefect waits 20 s by default; a first start creates and migrates its SQLite database, which on
    # a busy 2-core machine took longer than that. A larger value the user set is kept.
    wait = max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), TEMPORARY_SERVER_WAIT_S)
    server = SubprocessASGIServer()
    try:
        server.start(timeout=wait)
    except RuntimeError as e:
        raise TemporaryServerError(
            f"Prefect's temporary server did not answer within {wait} s ({e}); set PREFECT_API_URL to a "
            "running server (`prefect server start`), or raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
        ) from e
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        from quadflow.log import drain_prefect_workers

        drain_prefect_workers()  # the run's last logs and events, while the server is still up
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _lock_timeout(value: str) -> float:
    """--lock-timeout as seconds: a finite number >= 0 (NaN would wait forever, -1 failed with a traceback)."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"invalid --lock-timeout = {value}: give a number of seconds >= 0")
    return seconds


def _check_paths(settings: Settings) -> None:
    """Fail on a missing or unreadable input, an unreachable bucket, a store that is a directory, or an
    output this run must not or cannot write, before a Prefect server start."""
    from quadflow import objectstore as ob
    from quadflow.tasks.export import check_output
    from quadflow.tasks.ingest import list_inputs

    store = Path(settings.store)
    if store.is_dir():
        raise ConfigError(f"invalid setting store = {settings.store!r}: is a directory; name the DuckDB file in "
                          f"it, e.g. {str(store / 'quadflow.duckdb')!r}")
    s = settings.ingest
    c = ob.client(settings.objectstore) if any(
        ob.is_s3(p) for p in (*s.inputs, *s.targets, settings.export.output)) else None
    list_inputs(s.inputs, settings.objectstore, since=s.since, dates=s.partitions, client=c)
    if s.targets:
        list_inputs(s.targets, settings.objectstore, role="target", client=c)
    if ob.is_s3(settings.export.output):
        ob.check_access(c, ob.prefix_url(settings.export.output))
    check_output(settings, str(store.resolve()), client=c)


def _run(settings: Settings, lock_timeout: float = 3600.0) -> int:
    _check_paths(settings)
    _prepare_environment()
    from quadflow.flows.curate import run_curate
    from quadflow.locking import default_owner, store_lock, store_lock_path

    # One run at a time per store: a second `quadflow run` over it waits (and says so) instead
    # of failing on DuckDB's single-writer lock.
    with store_lock(store_lock_path(settings.store), timeout=lock_timeout,
                    owner=f"quadflow run, {default_owner()}"), \
            _prefect_api():
        result = run_curate(settings)
    _print_result(result)
    return 0


def _print_result(result: dict) -> None:
    s = result.get("summary", {})
    print()
    print(f"selected {result['docs']:,} documents, {result['tokens']:,} tokens")
    for name in ("fill_fraction", "kl_reduction", "cluster_coverage", "quarantined", "near_duplicates"):
        if name in s:
            print(f"  {name}: {s[name]}")
    print(f"selection: {result['selection']}")
    print(f"manifest:  {result['manifest']}")
    print(f"report:    {result['report']}")
    print(f"store:     {result['store']}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from quadflow.log import to_stderr

    with to_stderr():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command == "run":
            settings = build_settings(args.config, _overrides(args))
            if args.show_settings:
                print(json.dumps(settings.model_dump(mode="json"), indent=2))
                return 0
            return _run(settings, _lock_timeout(args.lock_timeout))
        if args.command == "demo":
            if not DEMO_CONFIG.exists():
                raise ConfigError(f"quadflow demo curates the sample in the source repository's examples/ "
                                  f"({DEMO_CONFIG} is not there): run `make demo` in a checkout")
            out = Path(args.output)
            settings = build_settings(DEMO_CONFIG, {"store": str(out / "quadflow.duckdb"), "export": {"output": str(out)}})
            settings = _rebase_demo_inputs(settings)
            return _run(settings)
        if args.command == "report":
            return _report(args.store, args.output, _lock_timeout(args.lock_timeout))
        if args.command == "verify":
            return _verify(args.output, args.endpoint_url)
    except ConfigError as e:  # includes ObjectStoreError: missing bucket/key, denied, bad credentials
        print(f"quadflow: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except TemporaryServerError as e:
        print(f"quadflow: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, duckdb.Error) as e:
        from quadflow.locking import StoreLockTimeout
        from quadflow.objectstore import ObjectStoreIOError
        from quadflow.store import storage_problem

        if isinstance(e, (ObjectStoreIOError, StoreLockTimeout)):
            # transient failures that outlived every retry, or a store another run held too long
            print(f"quadflow: error: {e}", file=sys.stderr)
            return EXIT_FAILED
        problem = storage_problem(e)  # a full, read-only or locked disk or store: say so, no traceback
        if problem is None:
            raise
        print(f"quadflow: error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_FAILED


def _report(store: str, output: str | None, lock_timeout: float) -> int:
    """Rebuild the report, waiting (and saying so) while a run holds the store, as a second run would."""
    from quadflow.locking import default_owner, store_lock, store_lock_path
    from quadflow.tasks.report import report_from_store

    if not Path(store).is_file():
        raise ConfigError(f"store {store} does not exist" if not Path(store).exists() else
                          f"store {store} is not a file")
    with store_lock(store_lock_path(store), timeout=lock_timeout, owner=f"quadflow report, {default_owner()}"):
        result = report_from_store(store, output)
    print(f"report: {result.report_path}")
    return 0


def _verify(output: str, endpoint_url: str | None) -> int:
    from quadflow.objectstore import ObjectStoreSettings
    from quadflow.tasks.export import OutputError, verify_output

    try:
        settings = ObjectStoreSettings(endpoint_url=endpoint_url)
    except ValueError as e:
        raise ConfigError(f"invalid --endpoint-url {endpoint_url!r}: {e}") from None
    try:
        manifest = verify_output(output, settings)
    except OutputError as e:
        print(f"quadflow: not verified: {e}", file=sys.stderr)
        return EXIT_FAILED
    files = ", ".join(f"{o['path']} ({o['rows']:,} rows)" for o in manifest["outputs"])
    print(f"verified {output}: {files}; export key {manifest.get('export_key')}")
    return 0


def _rebase_demo_inputs(settings: Settings) -> Settings:
    """The demo config names repo-relative paths; make them work from any directory."""
    ingest = settings.ingest.model_copy(update={
        "inputs": [str(REPO_ROOT / p) for p in settings.ingest.inputs],
        "targets": [str(REPO_ROOT / p) for p in settings.ingest.targets],
    })
    return settings.model_copy(update={"ingest": ingest})


if __name__ == "__main__":
    sys.exit(main())
