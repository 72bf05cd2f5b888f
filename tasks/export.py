"""Export: publish the selected documents (Parquet or JSONL) with a manifest, atomically.

Readers trust only a directory whose manifest.json exists and whose checksums match, so a
publish writes the new selection and manifest aside (a hidden staging directory inside the
output, fsynced), and only then swaps them in: old manifest removed, selection moved into place
with os.replace, new manifest moved in last. A failure while writing (a full disk) leaves the
previous output as it was, still verifiable; a crash during the swap leaves either no manifest
or a complete output, never a manifest that describes files that are not there.

Before a run and again at publish time, `check_output` refuses an output that would lose
someone's data: a non-empty directory quadflow did not create (it writes `.quadflow-output`
into every directory it publishes to), an output another store published to (the manifest
names its store), an output inside an input (the next run would ingest the selection), or a
local output that is read-only or full. `export.overwrite` (--overwrite) lifts the first two.
Publishing into a directory holds an flock on its marker, so two runs never publish into one
directory at once; the second then finds the first's manifest and stops, naming it.

An s3:// output is written the same way into a temporary directory and published with
`objectstore.publish_prefix`: every file uploaded and verified (size, ETag) aside, under the
prefix's `.quadflow-staging/`, while the previous output stays published; then the old manifest
deleted, the staged objects copied into place server-side, manifest last. The published files
are then kept as a local copy next to the store (`<store>.exports/<bucket>/<prefix>/`), where
the report is written. A rerun compares the published manifest's export key and each object's
size and ETag (falling back to SHA-256) and rewrites nothing when they match. The manifest
records the endpoint URL and the retries the run needed, never a credential.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from prefect.cache_policies import CacheKeyFnPolicy

import quadflow
from quadflow import objectstore as ob
from quadflow.locking import default_owner, store_lock
from quadflow.log import get_logger
from quadflow.objectstore import ObjectStoreError, ObjectStoreSettings
from quadflow.settings import ConfigError, ExportSettings, Settings
from quadflow.store import StageRef, StoreRef, connect, query_sql, run_sql, stage_key
from quadflow.tasking import CACHE_POLICY, IO_RETRIES, stage_task

VERSION = "export-1"
MANIFEST = "manifest.json"
MARKER = ".quadflow-output"  # in every output directory quadflow publishes to; also the lock publishing holds
MIN_FREE_BYTES = 1 << 20  # a file system with less room than this counts as full before a run starts
SELECTION_FILES = {"parquet": "selection.parquet", "jsonl": "selection.jsonl"}
BATCH_ROWS = 20_000  # selected documents per streamed batch (bounds memory for big selections)
PACKAGES = ("prefect", "duckdb", "polars", "numpy", "scikit-learn", "scipy", "pyarrow", "matplotlib")
COMBINED = "combined"  # the score stage's weighted combination of every scorer
HEURISTIC = "heuristic"  # its `detail` lists the failed quality rules

# Output columns before and after the per-scorer score columns, with their types.
HEAD_COLUMNS = {
    "id": pl.String, "source_id": pl.String, "text": pl.String, "source": pl.String,
    "file": pl.String, "line": pl.Int64, "fields": pl.String, "n_tokens": pl.Int64,
    "cluster": pl.Int64,
}
TAIL_COLUMNS = {"heuristic_failed": pl.String, "rank": pl.Int64, "round": pl.Int64, "reason": pl.String}
# A carried input field whose name collides with an output column keeps its value under this prefix.
FIELD_PREFIX = "input_"


class OutputError(RuntimeError):
    """A published output that cannot be trusted: no manifest, or a file that does not match it."""


@dataclass(frozen=True)
class ExportResult:
    """Where the selection went and what the manifest says about it."""

    output: str
    selection_path: str
    manifest_path: str
    docs: int
    tokens: int
    manifest_sha256: str
    key: str
    url: str | None = None  # the s3:// prefix published to; `output` is then its local copy


@dataclass(frozen=True)
class OutputFile:
    """One published file as the manifest records it (path relative to the output directory)."""

    path: str
    sha256: str
    bytes: int
    rows: int


# --------------------------------------------------------------------------------------------
# Core: atomic files, checksums, manifest, selection writers (no Prefect, no DuckDB)
# --------------------------------------------------------------------------------------------


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def temp_path(final: Path) -> Path:
    """A hidden sibling of `final` to write into before moving it into place (same filesystem)."""
    return final.parent / f".{final.name}.tmp-{uuid.uuid4().hex}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def commit_file(tmp: Path, final: Path) -> None:
    """fsync `tmp`, move it over `final` in one step, fsync the directory so the move is durable."""
    _fsync_file(tmp)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the new one, never a partial one."""
    final = Path(path)
    tmp = temp_path(final)
    try:
        tmp.write_bytes(data)
        commit_file(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def pivot_scores(long: pl.DataFrame) -> tuple[pl.DataFrame, list[str]]:
    """(doc_idx, scorer, score, detail) rows -> one row per doc with score_<scorer> and heuristic_failed.

    Returns the wide frame and its score column names (scorers sorted, 'combined' last).
    """
    long = long.select(
        pl.col("doc_idx").cast(pl.Int64), pl.col("scorer").cast(pl.String),
        pl.col("score").cast(pl.Float64), pl.col("detail").cast(pl.String),
    )
    scorers = sorted(long["scorer"].unique().to_list(), key=lambda s: (s == COMBINED, s))
    for name in scorers:
        if not name or not name.replace("_", "").isalnum() or not name.isascii():
            raise ValueError(f"scorer name {name!r} cannot be a column name (letters, digits, _ only)")
    cols = [f"score_{s}" for s in scorers]
    if long.is_empty():
        return pl.DataFrame(schema={"doc_idx": pl.Int64, "heuristic_failed": pl.String}), cols
    wide = long.pivot(on="scorer", index="doc_idx", values="score")
    wide = wide.rename({s: f"score_{s}" for s in scorers})
    failed = long.filter(pl.col("scorer") == HEURISTIC).select("doc_idx", heuristic_failed="detail")
    wide = wide.join(failed, on="doc_idx", how="left")
    if HEURISTIC not in scorers:
        wide = wide.with_columns(heuristic_failed=pl.lit(None, dtype=pl.String))
    return wide, cols


def output_schema(score_cols: list[str]) -> dict[str, pl.DataType]:
    return {**HEAD_COLUMNS, **{c: pl.Float64 for c in score_cols}, **TAIL_COLUMNS}


def shape_batch(batch: pl.DataFrame, scores: pl.DataFrame, score_cols: list[str]) -> pl.DataFrame:
    """A batch of selected documents (export_selection.sql rows) -> output rows, order kept."""
    out = batch.join(scores, on="doc_idx", how="left", maintain_order="left")
    schema = output_schema(score_cols)
    return out.select([
        (pl.col(c) if c in out.columns else pl.lit(None)).cast(t).alias(c) for c, t in schema.items()
    ])


def jsonl_record(row: dict[str, Any]) -> dict[str, Any]:
    """One output object with the carried input fields merged in at top level.

    A carried field named like an output column is dropped when it holds the same value and kept
    under `input_<name>` when it does not, so nothing the input had is lost.
    """
    fields = row.pop("fields", None)
    carried = json.loads(fields) if fields else {}
    if not isinstance(carried, dict):
        raise ValueError(f"ingest fields must be a JSON object, got {fields!r}")
    for name, value in carried.items():
        if name not in row:
            row[name] = value
        elif row[name] != value:  # e.g. the input's own "id" next to quadflow's content id
            row[f"{FIELD_PREFIX}{name}"] = value
    for name, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            row[name] = None  # JSON has no NaN/inf
    return row


def write_selection(batches: Iterable[pl.DataFrame], path: str | Path, fmt: str,
                    score_cols: list[str]) -> OutputFile:
    """Stream shaped batches to `path` (written aside, then moved into place); returns its record."""
    final = Path(path)
    tmp = temp_path(final)
    rows = 0
    try:
        if fmt == "parquet":
            schema = pl.DataFrame(schema=output_schema(score_cols)).to_arrow().schema
            with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                for b in batches:
                    writer.write_table(b.to_arrow().cast(schema))
                    rows += b.height
        elif fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for b in batches:
                    for row in b.iter_rows(named=True):
                        f.write(json.dumps(jsonl_record(row), ensure_ascii=False, allow_nan=False))
                        f.write("\n")
                    rows += b.height
        else:
            raise ValueError(f"export format {fmt!r} is not one of {sorted(SELECTION_FILES)}")
        commit_file(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return OutputFile(path=final.name, sha256=sha256_file(final), bytes=final.stat().st_size, rows=rows)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "quadflow": quadflow.__version__}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def file_record(f: Any) -> dict[str, Any]:
    """A FileFingerprint as the manifest lists it: local files with SHA-256, objects with ETag (and version)."""
    rec = {"path": str(f.path), "size": int(f.size), "mtime_ns": int(f.mtime_ns), "sha256": f.sha256}
    if getattr(f, "etag", None):
        rec.update(etag=f.etag, version_id=getattr(f, "version_id", None))
    return rec


def build_manifest(*, settings: Settings, files: tuple, targets: tuple, store: StoreRef,
                   stage_keys: dict[str, str], counts: dict[str, Any], quarantined: dict[str, int],
                   outputs: list[OutputFile | dict[str, Any]], export_key: str, created_at: datetime,
                   ingest: dict[str, Any] | None = None,
                   objectstore: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to trust and reproduce an output: settings, versions, inputs, counts, checksums.

    `ingest`: how the ingest partition was built (incremental counts); `objectstore`: endpoint and
    the requests and retries of this run's object-store reads and writes.
    """
    budget = settings.select.budget_tokens
    extra = {k: v for k, v in (("ingest", ingest), ("objectstore", objectstore)) if v is not None}
    return {
        "quadflow_version": quadflow.__version__,
        "created_at": created_at.isoformat(),
        "export_key": export_key,
        "selection_key": stage_keys["select"],
        "settings": settings.model_dump(mode="json"),
        "packages": package_versions(),
        "inputs": {"pool": [file_record(f) for f in files], "target": [file_record(f) for f in targets]},
        "store": {"path": store.path, "store_id": store.store_id},
        "stage_keys": stage_keys,
        "counts": {
            **counts,
            "quarantined": dict(quarantined),
            "quarantined_total": int(sum(quarantined.values())),
            "budget_tokens": budget,
            "fill_fraction": round(counts["selected_tokens"] / budget, 6),
        },
        "outputs": [dict(o) if isinstance(o, dict) else vars(o) for o in outputs],
        **extra,
    }


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode("utf-8")


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> str:
    """Publish the manifest (the last step of a publish); returns its sha256."""
    data = manifest_bytes(manifest)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def verify_output(directory: str | Path, objectstore: ObjectStoreSettings | None = None) -> dict[str, Any]:
    """The manifest of a published output after checking every file against it; OutputError if not.

    `directory` may be an s3:// prefix: every object listed is then read back and its SHA-256
    checked (`objectstore` says where the store is; default: the standard AWS chain).
    """
    if ob.is_s3(str(directory)):
        c = ob.client(objectstore)
        url = ob.prefix_url(str(directory))
        manifest = _read_s3_manifest(c, url)
        if manifest is None:
            raise OutputError(f"{url}{MANIFEST} does not exist: the output at {url} is incomplete or was never "
                              f"published")
        _verify_s3_outputs(c, url, manifest[0], deep=True)
        return manifest[0]
    d = Path(directory)
    mpath = d / MANIFEST
    if not mpath.exists():
        raise OutputError(f"{mpath} does not exist: the output in {d} is incomplete or was never published")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        outputs = manifest["outputs"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise OutputError(f"{mpath} is not a valid manifest: {e}") from None
    for o in outputs:
        p = d / o["path"]
        if not p.exists():
            raise OutputError(f"{p} is listed in {mpath} but does not exist")
        size = p.stat().st_size
        if size != o["bytes"]:
            raise OutputError(f"{p} has {size} bytes but {mpath} says {o['bytes']}")
        digest = sha256_file(p)
        if digest != o["sha256"]:
            raise OutputError(f"{p} has sha256 {digest} but {mpath} says {o['sha256']}")
    return manifest


def published_manifest(directory: Path, export_key: str) -> dict[str, Any] | None:
    """The verified manifest already in `directory` for this export key, or None (publish needed)."""
    mpath = directory / MANIFEST
    if not mpath.exists():
        return None
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("export_key") != export_key:
        return None
    try:
        return verify_output(directory)
    except OutputError as e:
        get_logger().warning(f"export: republishing {directory}: {e}")
        return None


def _read_s3_manifest(c: ob.ObjectStoreClient, url: str) -> tuple[dict[str, Any], str] | None:
    """(manifest, its sha256) published under an s3:// prefix, or None when there is none."""
    murl = url + MANIFEST
    try:
        data = ob.read_bytes(c, murl)
    except ObjectStoreError as e:
        if e.code in ("NoSuchKey", "404"):
            return None
        raise
    try:
        manifest = json.loads(data)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("outputs"), list):
            raise ValueError("not a manifest object")
    except (UnicodeDecodeError, ValueError) as e:
        raise OutputError(f"{murl} is not a valid manifest: {e}") from None
    return manifest, hashlib.sha256(data).hexdigest()


def _object_sha256(c: ob.ObjectStoreClient, url: str, etag: str | None) -> str:
    h = hashlib.sha256()
    with ob.open_read(c, url, etag=etag) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _verify_s3_outputs(c: ob.ObjectStoreClient, url: str, manifest: dict[str, Any], *, deep: bool) -> None:
    """Check every object a manifest lists: size, then ETag (deep: always SHA-256); OutputError if not."""
    try:
        outputs = [(o["path"], int(o["bytes"]), o["sha256"], o.get("etag")) for o in manifest["outputs"]]
    except (KeyError, TypeError, ValueError) as e:
        raise OutputError(f"{url}{MANIFEST} is not a valid manifest: {e}") from None
    for path, size, sha, etag in outputs:
        ourl = url + path
        try:
            info = ob.head(c, ourl)
        except ObjectStoreError as e:
            if e.code == "NoSuchKey":
                raise OutputError(f"{ourl} is listed in {url}{MANIFEST} but does not exist") from None
            raise
        if info.size != size:
            raise OutputError(f"{ourl} has {info.size} bytes but {url}{MANIFEST} says {size}")
        if not deep and etag and info.etag == etag:
            continue  # the ETag the store computed for exactly the bytes we uploaded
        digest = _object_sha256(c, ourl, info.etag)
        if digest != sha:
            raise OutputError(f"{ourl} has sha256 {digest} but {url}{MANIFEST} says {sha}")


def published_manifest_s3(c: ob.ObjectStoreClient, url: str, export_key: str) -> tuple[dict[str, Any], str] | None:
    """(manifest, sha256) already published under `url` for this export key with intact objects, or None."""
    found = _read_s3_manifest(c, url)
    if found is None or found[0].get("export_key") != export_key:
        return None
    try:
        _verify_s3_outputs(c, url, found[0], deep=False)
    except OutputError as e:
        get_logger().warning(f"export: republishing {url}: {e}")
        return None
    return found


def own_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest.json quadflow wrote in `directory`, or None (absent, unreadable, or someone else's)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if isinstance(manifest, dict) and "quadflow_version" in manifest and "export_key" in manifest:
        return manifest
    return None


def _publisher(manifest: dict[str, Any]) -> str:
    store = manifest.get("store")
    return str(store.get("path")) if isinstance(store, dict) else "an unknown store"


def _clash(output: str, manifest: dict[str, Any] | None, store_path: str) -> ConfigError | None:
    """The error for an output another store published to, or None."""
    if manifest is None or _publisher(manifest) == store_path:
        return None
    return ConfigError(
        f"export.output = {output!r} holds the selection that store {_publisher(manifest)} published "
        f"({manifest.get('created_at', 'at an unknown time')}); this run's store is {store_path}. Two stores "
        f"publishing to one output would overwrite each other's selection: give this run its own --output, or "
        f"pass --overwrite (export.overwrite) to replace it")


def _own_store_names(out: Path, store_path: str) -> set[str]:
    """Names in `out` that belong to the run's own store when it lives there (e.g. `quadflow demo`)."""
    store = Path(store_path)
    if store.parent != out:
        return set()
    n = store.name
    return {n, f"{n}.wal", f"{n}.lock", f"{n}.tmp", f"{n}.parts", f"{n}.artifacts", f"{store.stem}.exports"}


def _existing(path: Path) -> Path:
    """`path` or its nearest existing ancestor (where a directory would be created)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _check_output_dir(out: Path, store_path: str, overwrite: bool, room: bool) -> None:
    shown = str(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export.output = {shown!r} is a file, not a directory")
    where = _existing(out)
    if not os.access(where, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(where).f_flag & os.ST_RDONLY)
        why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
        raise ConfigError(f"export.output = {shown!r} cannot be written: {where} {why}")
    free = shutil.disk_usage(where).free
    if room and free < MIN_FREE_BYTES:
        raise ConfigError(f"export.output = {shown!r} cannot be written: the file system holding {where} is full "
                          f"({free:,} bytes free); free space there or choose another --output")
    if overwrite or not out.is_dir():
        return
    manifest = own_manifest(out)
    if (err := _clash(shown, manifest, store_path)) is not None:
        raise err
    if manifest is not None or (out / MARKER).exists():
        return
    foreign = sorted(set(os.listdir(out)) - {MARKER} - _own_store_names(out, store_path))
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(
            f"export.output = {shown!r} is a non-empty directory quadflow did not create (it holds {listed}); "
            f"publishing would replace selection.*, manifest.json and report/ in it. Choose a new or empty "
            f"directory, or pass --overwrite (export.overwrite) to publish there anyway")


def check_output(settings: Settings, store_path: str, client: ob.ObjectStoreClient | None = None, *,
                 room: bool = True) -> None:
    """ConfigError when this run must not publish to export.output (checked before a run and at publish).

    `store_path`: the run's store, resolved; an output another store published to is refused. For an
    s3:// output the manifest is read with `client` (default: one on settings.objectstore). `room`: also
    refuse a local output on a file system with less than MIN_FREE_BYTES free (before a run; at publish
    time the write itself says whether it fits).
    """
    from quadflow.tasks.ingest import would_read

    output = settings.export.output
    if ob.is_s3(output):
        url = ob.prefix_url(output)
        candidates = [url + name for name in SELECTION_FILES.values()]
    else:
        out = output_dir(settings.export)
        candidates = [str(out / name) for name in SELECTION_FILES.values()]
    for role, patterns in (("--input", settings.ingest.inputs), ("--target", settings.ingest.targets)):
        for candidate in candidates:
            if (pattern := would_read(patterns, candidate)) is not None:
                raise ConfigError(
                    f"export.output = {output!r} lies inside the {role} {pattern!r}: the next run would ingest "
                    f"its own selection ({candidate}). Choose an --output outside the inputs")
    if not ob.is_s3(output):
        return _check_output_dir(out, store_path, settings.export.overwrite, room)
    if settings.export.overwrite:
        return
    c = client or ob.client(settings.objectstore)
    try:
        found = _read_s3_manifest(c, url)
    except OutputError:  # not a manifest quadflow can read: someone else's file
        raise ConfigError(f"export.output = {output!r} holds a {MANIFEST} quadflow did not write; choose another "
                          f"prefix, or pass --overwrite (export.overwrite) to replace it") from None
    if found is not None and "quadflow_version" not in found[0]:
        raise ConfigError(f"export.output = {output!r} holds a {MANIFEST} quadflow did not write; choose another "
                          f"prefix, or pass --overwrite (export.overwrite) to replace it")
    if found is not None and (err := _clash(url, found[0], store_path)) is not None:
        raise err


def output_dir(section: ExportSettings) -> Path:
    """The local output directory (s3:// outputs have a local copy instead: see local_copy_dir)."""
    if ob.is_s3(section.output):
        raise ConfigError(f"export.output = {section.output!r} is an s3:// prefix, not a directory")
    if "://" in section.output:
        raise ConfigError(
            f"export.output = {section.output!r}: only local directories and s3:// prefixes are supported"
        )
    return Path(section.output).absolute()


def local_copy_dir(store: StoreRef, url: str) -> Path:
    """Where the files published to an s3:// prefix are kept locally: `<store>.exports/<bucket>/<prefix>/`."""
    bucket, prefix = ob.parse(ob.prefix_url(url))
    root = Path(store.path)
    return root.parent / f"{root.stem}.exports" / bucket / prefix


def _fingerprints(files: tuple) -> list[list[Any]]:
    # mtime is left out: touching an unchanged file must not change the key; objects add their ETag.
    return [[str(f.path), int(f.size), f.sha256, *([f.etag] if getattr(f, "etag", None) else [])] for f in files]


def export_key(settings: Settings, files: tuple, targets: tuple, docs: StageRef, clusters: StageRef,
               scores: StageRef, selection: StageRef, features: StageRef | None = None) -> str:
    section = settings.export.model_dump(mode="json", exclude={"overwrite"})  # where, not what, is published
    return stage_key(
        "export", VERSION, section, settings.select.budget_tokens, _fingerprints(files),
        _fingerprints(targets), docs, clusters, scores, selection, features, settings.seed,
    )


# --------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------


def _recorded_manifest_sha(store: StoreRef, key: str, output: str) -> str | None:
    """The manifest checksum export_runs recorded for (key, output), or None."""
    try:
        with connect(store) as con:
            row = query_sql(con, "export_published", {"key": key, "output": output}).fetchone()
    except (duckdb.Error, FileNotFoundError, RuntimeError):  # no store or table yet, or a replaced store
        return None
    return row[0] if row else None


def _output_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Cache on whether this key's output is still what we published, so a deleted output recomputes.

    Never published from this store: "published" (plain input caching). Published and the manifest
    on disk is the recorded one with its files present: "published" again, so an unchanged rerun is
    a cache hit. Published but the manifest is gone or different: a key naming both checksums, so
    the task runs and republishes.
    """
    settings: Settings = parameters["settings"]
    key = export_key(settings, parameters["files"], parameters["targets"], parameters["docs"],
                     parameters["clusters"], parameters["scores"], parameters["selection"],
                     parameters.get("features"))
    if ob.is_s3(settings.export.output):
        return _s3_output_cache_key(settings, parameters["docs"].store, key)
    out = output_dir(settings.export)
    recorded = _recorded_manifest_sha(parameters["docs"].store, key, str(out))
    if recorded is None:
        return "published"
    mpath = out / MANIFEST
    on_disk = hashlib.sha256(mpath.read_bytes()).hexdigest() if mpath.exists() else "missing"
    if on_disk == recorded:
        try:
            outputs = json.loads(mpath.read_text(encoding="utf-8"))["outputs"]
            if all((out / o["path"]).exists() and (out / o["path"]).stat().st_size == o["bytes"] for o in outputs):
                return "published"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        on_disk = "files-changed"
    return f"changed:{recorded}:{on_disk}"


def _s3_output_cache_key(settings: Settings, store: StoreRef, key: str) -> str:
    """As for a directory: "published" while the recorded manifest and its objects are intact in the bucket."""
    url = ob.prefix_url(settings.export.output)
    recorded = _recorded_manifest_sha(store, key, url)
    if recorded is None:
        return "published"
    try:
        c = ob.client(settings.objectstore)
        found = _read_s3_manifest(c, url)
        if found is None:
            return f"changed:{recorded}:missing"
        if found[1] == recorded:
            _verify_s3_outputs(c, url, found[0], deep=False)
            return "published"
        return f"changed:{recorded}:{found[1]}"
    except (ObjectStoreError, OSError, OutputError):
        # unreadable or changed: run the task, which republishes or fails with the store's message
        return f"changed:{recorded}:unverified:{uuid.uuid4().hex}"


EXPORT_CACHE_POLICY = CACHE_POLICY + CacheKeyFnPolicy(cache_key_fn=_output_cache_key)


def _stream(reader: pa.RecordBatchReader, scores: pl.DataFrame, score_cols: list[str]) -> Iterator[pl.DataFrame]:
    for rb in reader:
        if rb.num_rows:
            yield shape_batch(pl.from_arrow(rb), scores, score_cols)


def _ingest_info(con, docs_key: str) -> dict[str, Any] | None:
    """How the ingest partition was built (base, inputs reused/read, object reads), when recorded."""
    try:
        frame = query_sql(con, "export_ingest", {"docs_key": docs_key}).pl()
    except duckdb.CatalogException:  # a store written before ingest recorded its runs
        return None
    if frame.is_empty():
        return None
    row = frame.row(0, named=True)
    return {k: (v if v is None or isinstance(v, str) else int(v)) for k, v in row.items()}


def _objectstore_info(settings: Settings, files: tuple, targets: tuple, ingest: dict[str, Any] | None,
                      s3_output: bool) -> dict[str, Any] | None:
    """Endpoint and read counts when the run touched an object store (writes are added while publishing)."""
    if not s3_output and not any(getattr(f, "etag", None) for f in (*files, *targets)):
        return None
    ingest = ingest or {}
    return {
        "endpoint_url": ob.endpoint_of(settings.objectstore),  # also when AWS_ENDPOINT_URL set it
        "region": settings.objectstore.region,
        "read": {"objects": ingest.get("objects_read", 0), "bytes": ingest.get("bytes_read", 0),
                 "retries": ingest.get("retries", 0)},
    }


def _write_selection_file(con, settings: Settings, out: Path, stage_keys: dict[str, str]
                          ) -> tuple[dict[str, int], dict[str, int], OutputFile]:
    """Counts, quarantine counts and the selection file written into `out` (aside, then moved in)."""
    params = {"docs_key": stage_keys["ingest"], "clusters_key": stage_keys["cluster"],
              "scores_key": stage_keys["score"], "selection_key": stage_keys["select"]}
    counts = {c: int(v) for c, v in query_sql(con, "export_counts", params).pl().row(0, named=True).items()}
    quarantined = {r: int(n) for r, n in query_sql(con, "export_quarantine", params).fetchall()}
    wide, score_cols = pivot_scores(query_sql(con, "export_scores", params).pl())
    fmt = settings.export.format
    name = SELECTION_FILES[fmt]
    reader = query_sql(con, "export_selection", params).fetch_record_batch(BATCH_ROWS)
    written = write_selection(_stream(reader, wide, score_cols), out / name, fmt, score_cols)
    if written.rows != counts["selected_docs"]:
        raise RuntimeError(
            f"export wrote {written.rows} rows but select_selection holds {counts['selected_docs']} for key "
            f"{stage_keys['select']}: selected doc_idx missing from ingest_docs key {stage_keys['ingest']}"
        )
    return counts, quarantined, written


def _publish(con, settings: Settings, files: tuple, targets: tuple, store: StoreRef, out: Path,
             stage_keys: dict[str, str]) -> tuple[dict[str, Any], str]:
    """Write the selection and manifest aside, then swap them in: old manifest out, selection in, manifest last.

    Everything that can fail for want of space happens before the old manifest is touched, so a failed
    republish leaves the previous output verifiable.
    """
    mpath = out / MANIFEST
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".publish-*"):  # left by a publish that was killed (we hold the directory's lock)
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".publish-") as tmp:
        staged = Path(tmp)
        counts, quarantined, written = _write_selection_file(con, settings, staged, stage_keys)
        name = written.path
        ingest = _ingest_info(con, stage_keys["ingest"])
        manifest = build_manifest(
            settings=settings, files=files, targets=targets, store=store, stage_keys=stage_keys, counts=counts,
            quarantined=quarantined, outputs=[written], export_key=stage_keys["export"],
            created_at=datetime.now(timezone.utc), ingest=ingest,
            objectstore=_objectstore_info(settings, files, targets, ingest, s3_output=False),
        )
        manifest_sha = write_manifest(staged / MANIFEST, manifest)
        # the swap: renames only, nothing left to run out of space
        mpath.unlink(missing_ok=True)  # from here until the last move, readers see an unpublished directory
        _fsync_dir(out)
        os.replace(staged / name, out / name)
        for other in SELECTION_FILES.values():  # a file of the other format is no longer described
            if other != name:
                (out / other).unlink(missing_ok=True)
        os.replace(staged / MANIFEST, mpath)  # last: the output is now published
        _fsync_dir(out)
    return manifest, manifest_sha


def _publish_s3(con, c: ob.ObjectStoreClient, settings: Settings, files: tuple, targets: tuple, store: StoreRef,
                url: str, local: Path, stage_keys: dict[str, str]) -> tuple[dict[str, Any], str]:
    """Write the selection and manifest into a temporary directory, publish them under `url` manifest
    last, then keep them as the local copy in `local`."""
    log = get_logger()
    local.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=local, prefix=".publish-") as tmp:
        staged = Path(tmp)
        counts, quarantined, written = _write_selection_file(con, settings, staged, stage_keys)
        s = c.settings
        etag = ob.expected_etag(staged / written.path, s.multipart_threshold, s.multipart_chunksize)
        ingest = _ingest_info(con, stage_keys["ingest"])
        store_info = _objectstore_info(settings, files, targets, ingest, s3_output=True)
        manifest = build_manifest(
            settings=settings, files=files, targets=targets, store=store, stage_keys=stage_keys, counts=counts,
            quarantined=quarantined, outputs=[{**vars(written), "etag": etag}], export_key=stage_keys["export"],
            created_at=datetime.now(timezone.utc), ingest=ingest, objectstore=store_info,
        )
        mpath = staged / MANIFEST
        write_manifest(mpath, manifest)
        aborted = ob.abort_incomplete_uploads(c, url)  # parts left by a publish that was killed
        if aborted:
            log.info(f"export: aborted {aborted} incomplete multipart upload(s) under {url}")
        before = c.counters.snapshot()

        def record_writes(objects: tuple[ob.ObjectInfo, ...]) -> None:
            after = c.counters.snapshot()
            store_info["write"] = {"objects": len(objects) + 1, "bytes": sum(o.size for o in objects),
                                   "retries": after["retries"] - before["retries"]}
            write_manifest(mpath, manifest)  # the manifest's own upload is the one request not counted

        result = ob.publish_prefix(c, staged, url, before_manifest=record_writes)
        data = mpath.read_bytes()
        manifest_sha = hashlib.sha256(data).hexdigest()
        for other in SELECTION_FILES.values():  # a file of the other format is no longer described
            if other != written.path and url + other in result.stale:
                ob.delete(c, url + other)
        for name in (written.path, MANIFEST):
            os.replace(staged / name, local / name)
    for other in SELECTION_FILES.values():
        if other != written.path:
            (local / other).unlink(missing_ok=True)
    w = store_info["write"]
    log.info(f"export: published {w['objects']} objects ({w['bytes']:,} bytes) to {url} with {w['retries']} "
             f"retries; {store_info['read']['retries']} retries reading {store_info['read']['objects']} objects")
    return manifest, manifest_sha


def _record(con, key: str, output: str, manifest: dict[str, Any], manifest_sha: str) -> None:
    c = manifest["counts"]
    published_at = datetime.fromisoformat(manifest["created_at"]).astimezone(timezone.utc).replace(tzinfo=None)
    run_sql(con, "export_delete", {"key": key})
    run_sql(con, "export_insert", {
        "key": key, "output": output, "manifest_sha256": manifest_sha, "published_at": published_at,
        "docs": c["selected_docs"], "tokens": c["selected_tokens"],
    })


def _export_s3(settings: Settings, files: tuple, targets: tuple, store: StoreRef, key: str,
               stage_keys: dict[str, str]) -> ExportResult:
    log = get_logger()
    url = ob.prefix_url(settings.export.output)
    c = ob.client(settings.objectstore)
    local = local_copy_dir(store, url)
    check_output(settings, store.path, client=c, room=False)
    found = published_manifest_s3(c, url, key)
    with connect(store) as con:
        run_sql(con, "export_create")
        if found is not None:
            manifest, manifest_sha = found
            log.info(f"export: {url} already published for key {key}; nothing rewritten")
        else:
            manifest, manifest_sha = _publish_s3(con, c, settings, files, targets, store, url, local, stage_keys)
            now = _read_s3_manifest(c, url)  # an object store has no lock: see who published last
            if now is None or now[1] != manifest_sha:
                raise ConfigError(
                    f"another run published to {url} while this one did (its manifest is now "
                    f"{'gone' if now is None else 'from store ' + _publisher(now[0])}); give each run its own "
                    f"output prefix")
        _record(con, key, url, manifest, manifest_sha)
    n = manifest["counts"]
    log.info(f"export: {n['selected_docs']:,} documents, {n['selected_tokens']:,} tokens in {url}")
    return ExportResult(
        output=str(local), selection_path=url + manifest["outputs"][0]["path"], manifest_path=url + MANIFEST,
        docs=int(n["selected_docs"]), tokens=int(n["selected_tokens"]), manifest_sha256=manifest_sha, key=key,
        url=url,
    )


@stage_task("export", cache_policy=EXPORT_CACHE_POLICY, **IO_RETRIES)
def export(settings: Settings, files: tuple, targets: tuple, docs: StageRef, clusters: StageRef,
           scores: StageRef, selection: StageRef, features: StageRef | None = None) -> ExportResult:
    """Publish the selection with its manifest; a no-op when this exact selection is already published.

    `features` is optional: when given, its key goes into the manifest so `quadflow report` can
    recompute the KL reduction from the store later. An s3:// output returns its local copy as
    `output` (the report is written there) and the published prefix as `url`.
    """
    log = get_logger()
    key = export_key(settings, files, targets, docs, clusters, scores, selection, features)
    stage_keys = {"ingest": docs.key, "cluster": clusters.key, "score": scores.key, "select": selection.key,
                  **({"featurize": features.key} if features is not None else {}), "export": key}
    if ob.is_s3(settings.export.output):
        return _export_s3(settings, files, targets, docs.store, key, stage_keys)
    out = output_dir(settings.export)
    mpath = out / MANIFEST
    check_output(settings, docs.store.path, room=False)
    with store_lock(out / MARKER, owner=f"export from store {docs.store.path}, {default_owner()}"):
        if not settings.export.overwrite:  # again under the lock: a run that held it may have published
            if (err := _clash(settings.export.output, own_manifest(out), docs.store.path)) is not None:
                raise err
        manifest = published_manifest(out, key)
        with connect(docs.store) as con:
            run_sql(con, "export_create")
            if manifest is not None:
                log.info(f"export: {out} already published for key {key}; nothing rewritten")
                manifest_sha = hashlib.sha256(mpath.read_bytes()).hexdigest()
            else:
                manifest, manifest_sha = _publish(con, settings, files, targets, docs.store, out, stage_keys)
            _record(con, key, str(out), manifest, manifest_sha)
    c = manifest["counts"]
    log.info(f"export: {c['selected_docs']:,} documents, {c['selected_tokens']:,} tokens in {out}")
    return ExportResult(
        output=str(out), selection_path=str(out / manifest["outputs"][0]["path"]), manifest_path=str(mpath),
        docs=int(c["selected_docs"]), tokens=int(c["selected_tokens"]), manifest_sha256=manifest_sha, key=key,
    )
