"""Export: publish the selected documents (Parquet or JSONL) with a manifest, atomically.

Readers trust only a directory whose manifest.json exists and whose checksums match, so a
publish removes the old manifest first, moves each file into place with os.replace after an
fsync, and writes the new manifest last. A crash at any point leaves either no manifest or a
complete, verifiable output, never a manifest that describes files that are not there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
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
from quadflow.log import get_logger
from quadflow.settings import ConfigError, ExportSettings, Settings
from quadflow.store import StageRef, StoreRef, connect, query_sql, run_sql, stage_key
from quadflow.tasking import CACHE_POLICY, stage_task

VERSION = "export-1"
MANIFEST = "manifest.json"
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
    """A FileFingerprint (path, size, mtime_ns, sha256) as the manifest lists it."""
    return {"path": str(f.path), "size": int(f.size), "mtime_ns": int(f.mtime_ns), "sha256": f.sha256}


def build_manifest(*, settings: Settings, files: tuple, targets: tuple, store: StoreRef,
                   stage_keys: dict[str, str], counts: dict[str, Any], quarantined: dict[str, int],
                   outputs: list[OutputFile], export_key: str, created_at: datetime) -> dict[str, Any]:
    """Everything needed to trust and reproduce an output: settings, versions, inputs, counts, checksums."""
    budget = settings.select.budget_tokens
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
        "outputs": [vars(o) for o in outputs],
    }


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode("utf-8")


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> str:
    """Publish the manifest (the last step of a publish); returns its sha256."""
    data = manifest_bytes(manifest)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def verify_output(directory: str | Path) -> dict[str, Any]:
    """The manifest of a published output after checking every file against it; OutputError if not."""
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


def output_dir(section: ExportSettings) -> Path:
    if "://" in section.output:
        raise ConfigError(
            f"export.output = {section.output!r}: only local directories are supported for publishing"
        )
    return Path(section.output).absolute()


def _fingerprints(files: tuple) -> list[list[Any]]:
    # mtime is left out: touching an unchanged file must not change the key.
    return [[str(f.path), int(f.size), f.sha256] for f in files]


def export_key(settings: Settings, files: tuple, targets: tuple, docs: StageRef, clusters: StageRef,
               scores: StageRef, selection: StageRef, features: StageRef | None = None) -> str:
    return stage_key(
        "export", VERSION, settings.export, settings.select.budget_tokens, _fingerprints(files),
        _fingerprints(targets), docs, clusters, scores, selection, features, settings.seed,
    )


# --------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------


def _recorded_manifest_sha(store: StoreRef, key: str, output: str) -> str | None:
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
    out = output_dir(settings.export)
    key = export_key(settings, parameters["files"], parameters["targets"], parameters["docs"],
                     parameters["clusters"], parameters["scores"], parameters["selection"],
                     parameters.get("features"))
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


EXPORT_CACHE_POLICY = CACHE_POLICY + CacheKeyFnPolicy(cache_key_fn=_output_cache_key)


def _stream(reader: pa.RecordBatchReader, scores: pl.DataFrame, score_cols: list[str]) -> Iterator[pl.DataFrame]:
    for rb in reader:
        if rb.num_rows:
            yield shape_batch(pl.from_arrow(rb), scores, score_cols)


def _publish(con, settings: Settings, files: tuple, targets: tuple, store: StoreRef, out: Path,
             stage_keys: dict[str, str]) -> tuple[dict[str, Any], str]:
    """Remove the manifest, write the selection aside and move it in, write the manifest last."""
    params = {"docs_key": stage_keys["ingest"], "clusters_key": stage_keys["cluster"],
              "scores_key": stage_keys["score"], "selection_key": stage_keys["select"]}
    mpath = out / MANIFEST
    out.mkdir(parents=True, exist_ok=True)
    mpath.unlink(missing_ok=True)  # first: from here on, readers see an unpublished directory
    _fsync_dir(out)
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
    manifest = build_manifest(
        settings=settings, files=files, targets=targets, store=store, stage_keys=stage_keys, counts=counts,
        quarantined=quarantined, outputs=[written], export_key=stage_keys["export"],
        created_at=datetime.now(timezone.utc),
    )
    manifest_sha = write_manifest(mpath, manifest)  # last: the output is now published
    for other in SELECTION_FILES.values():  # a file of the other format is no longer described
        if other != name:
            (out / other).unlink(missing_ok=True)
    return manifest, manifest_sha


@stage_task("export", cache_policy=EXPORT_CACHE_POLICY)
def export(settings: Settings, files: tuple, targets: tuple, docs: StageRef, clusters: StageRef,
           scores: StageRef, selection: StageRef, features: StageRef | None = None) -> ExportResult:
    """Publish the selection with its manifest; a no-op when this exact selection is already published.

    `features` is optional: when given, its key goes into the manifest so `quadflow report` can
    recompute the KL reduction from the store later.
    """
    log = get_logger()
    out = output_dir(settings.export)
    key = export_key(settings, files, targets, docs, clusters, scores, selection, features)
    stage_keys = {"ingest": docs.key, "cluster": clusters.key, "score": scores.key, "select": selection.key,
                  **({"featurize": features.key} if features is not None else {}), "export": key}
    mpath = out / MANIFEST
    manifest = published_manifest(out, key)
    with connect(docs.store) as con:
        run_sql(con, "export_create")
        if manifest is not None:
            log.info(f"export: {out} already published for key {key}; nothing rewritten")
            manifest_sha = hashlib.sha256(mpath.read_bytes()).hexdigest()
        else:
            manifest, manifest_sha = _publish(con, settings, files, targets, docs.store, out, stage_keys)
        c = manifest["counts"]
        log.info(f"export: {c['selected_docs']:,} documents, {c['selected_tokens']:,} tokens in {out}")
        published_at = datetime.fromisoformat(manifest["created_at"]).astimezone(timezone.utc).replace(tzinfo=None)
        run_sql(con, "export_delete", {"key": key})
        run_sql(con, "export_insert", {
            "key": key, "output": str(out), "manifest_sha256": manifest_sha, "published_at": published_at,
            "docs": c["selected_docs"], "tokens": c["selected_tokens"],
        })
    return ExportResult(
        output=str(out), selection_path=str(out / manifest["outputs"][0]["path"]), manifest_path=str(mpath),
        docs=int(c["selected_docs"]), tokens=int(c["selected_tokens"]), manifest_sha256=manifest_sha, key=key,
    )
