"""The DuckDB store: one file per workspace, one table family per stage.

Stages hand each other small, hashable references (`StageRef`), never connections or frames.
Every stage table carries a `key` column: the hash of the stage's settings and upstream keys.
A stage writes its partition with delete-then-insert on that key, so a rerun is idempotent,
and a cached reference from an earlier configuration still points at rows that exist.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import duckdb
import polars as pl

# Installed, the queries live in quadflow/sql; in the source tree (and editable installs) in top-level sql/.
_HERE = Path(__file__).resolve().parent
SQL_DIR = _HERE / "sql" if (_HERE / "sql").is_dir() else _HERE.parent / "sql"
_SQL_NAME = re.compile(r"^[a-z]+_[a-z0-9_]+$")


@dataclass(frozen=True)
class StoreRef:
    """Where the store is and which incarnation of it: a new file gets a new store_id."""

    path: str
    store_id: str


@dataclass(frozen=True)
class StageRef:
    """A stage's output partition: what downstream tasks take as input (and cache on)."""

    stage: str
    key: str
    store: StoreRef
    rows: int
    fingerprint: str


def stage_key(stage: str, version: str, *parts: Any) -> str:
    """Deterministic key of a stage's output from its code version, settings and upstream refs."""
    payload = json.dumps([stage, version, *[_jsonable(p) for p in parts]], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, StageRef):
        return {"stage": obj.stage, "key": obj.key, "fingerprint": obj.fingerprint}
    if isinstance(obj, StoreRef):
        return obj.store_id
    return obj


def load_sql(name: str) -> str:
    """Text of sql/<name>.sql; names are `<stage>_<verb>` and never come from users."""
    if not _SQL_NAME.match(name):
        raise ValueError(f"bad SQL file name {name!r}")
    path = SQL_DIR / f"{name}.sql"
    if not path.exists():
        raise FileNotFoundError(f"no SQL file {path}")
    return path.read_text()


def run_sql(con: duckdb.DuckDBPyConnection, name: str, params: dict[str, Any] | None = None) -> None:
    """Run every statement of sql/<name>.sql with bound parameters ($name placeholders)."""
    text = load_sql(name)
    for stmt in _split_statements(text):
        used = {k: v for k, v in (params or {}).items() if f"${k}" in stmt}
        con.execute(stmt, used) if used else con.execute(stmt)


def query_sql(con: duckdb.DuckDBPyConnection, name: str, params: dict[str, Any] | None = None):
    """Run a single-statement sql/<name>.sql and return the DuckDB relation result (call .pl())."""
    stmts = _split_statements(load_sql(name))
    if len(stmts) != 1:
        raise ValueError(f"sql/{name}.sql must hold exactly one statement to be queried")
    stmt = stmts[0]
    used = {k: v for k, v in (params or {}).items() if f"${k}" in stmt}
    return con.execute(stmt, used) if used else con.execute(stmt)


def _split_statements(text: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


# DuckDB caches table blocks up to its memory limit (80% of RAM by default), so a store connection's memory
# would grow with the pool. Capped, it spills to <store>.tmp instead. QUADFLOW_DUCKDB_MEMORY overrides.
DEFAULT_MEMORY_LIMIT = "1GB"
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")


# The shard text exports read every document's text through one connection, and DuckDB keeps the table
# blocks it read cached up to its cap, so the flow process's peak grew with the pool (dedup's stage: +0.4 GB
# from 1M to 5M documents). They run under this cap, measured no slower; nothing reads those blocks again
# through that connection. (Ingest's load, whose cache grows the same way, stays under the store's cap: under
# this one it took 11 s more CPU at 5M documents, and dedup 8 s more after it.)
EXPORT_MEMORY_LIMIT = "256MB"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _size_bytes(size: str) -> float:
    """Bytes of a size _MEMORY accepts, such as 256MB or 1.5GiB."""
    unit = _MEMORY.match(size).group(2)
    return float(size[: -len(unit)]) * _UNITS[unit]


@contextmanager
def capped_memory(con: duckdb.DuckDBPyConnection, limit: str = EXPORT_MEMORY_LIMIT) -> Iterator[str]:
    """DuckDB's memory cap lowered to `limit` while the block runs (never raised above the store's), then restored.

    Yields the cap in force."""
    configured = _config()["memory_limit"]
    use = limit if _size_bytes(limit) < _size_bytes(configured) else configured
    try:
        con.execute(f"set memory_limit = '{use}'")
    except duckdb.OutOfMemoryException as e:  # more than `limit` is in use and cannot be evicted: go on as it is
        from quadflow.log import get_logger

        get_logger().warning(f"DuckDB's memory cap stays at {configured} ({e})")
        use = configured
    try:
        yield use
    finally:
        con.execute(f"set memory_limit = '{configured}'")


def _config() -> dict[str, str]:
    limit = os.environ.get("QUADFLOW_DUCKDB_MEMORY", DEFAULT_MEMORY_LIMIT)
    if not _MEMORY.match(limit):
        raise ValueError(f"QUADFLOW_DUCKDB_MEMORY = {limit!r}: expected a size such as 1GB or 512MB")
    return {"memory_limit": limit}


# A write the file system refuses for good: full (or over quota or the file size limit), read-only, not
# permitted. Retrying does not help and the message should say which, not show a traceback.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
NO_WRITE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
_DUCKDB_NO_SPACE = ("No space left on device", "Disk quota exceeded", "File too large")
_DUCKDB_NO_WRITE = ("Read-only file system", "Permission denied")


def storage_problem(err: BaseException) -> str | None:
    """One line saying what the file system refused and what to do, when `err` is such a refusal; else None.

    Covers OSErrors (shard parts, exports, lock files) and DuckDB's IO errors, which name the store file.
    """
    if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS | NO_WRITE_ERRNOS:
        where = f" {err.filename}" if err.filename else ""
        if err.errno in NO_SPACE_ERRNOS:
            return (f"no space to write{where}: {err.strerror}; free space on that file system or point --store, "
                    f"--output or --parts at a larger one")
        return f"cannot write{where}: {err.strerror}; check the permissions and that the file system is writable"
    if isinstance(err, duckdb.Error):
        text = str(err).strip()
        if any(m in text for m in _DUCKDB_NO_SPACE):
            return (f"the store ran out of space: {text}; free space there or move --store to a larger file "
                    f"system (DuckDB also spills to <store>.tmp beside it)")
        if any(m in text for m in _DUCKDB_NO_WRITE):
            return f"the store cannot be written: {text}"
        if "Could not set lock on file" in text:
            return (f"the store is open in another process: {text}; wait for that process (a quadflow run over "
                    f"a store holds <store>.lock) or close it")
    return None


def open_store(path: str | Path) -> StoreRef:
    """Create the store (and its meta table) if needed; return its reference."""
    p = Path(path)
    if p.is_dir():
        from quadflow.settings import ConfigError

        raise ConfigError(f"invalid setting store = {str(path)!r}: is a directory; name the DuckDB file in it, "
                          f"e.g. {str(p / 'quadflow.duckdb')!r}")
    p.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(p), config=_config()) as con:
        con.execute("create table if not exists store_meta (name varchar primary key, value varchar)")
        row = con.execute("select value from store_meta where name = 'store_id'").fetchone()
        if row is None:
            store_id = uuid.uuid4().hex
            con.execute("insert into store_meta values ('store_id', ?)", [store_id])
        else:
            store_id = row[0]
    return StoreRef(path=str(p.resolve()), store_id=store_id)


@contextmanager
def connect(store: StoreRef, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to the store, checked to be the same incarnation the reference names."""
    p = Path(store.path)
    if not p.exists():
        raise FileNotFoundError(f"store {p} does not exist (was it deleted during the run?)")
    con = duckdb.connect(str(p), read_only=read_only, config=_config())
    try:
        row = con.execute("select value from store_meta where name = 'store_id'").fetchone()
        if row is None or row[0] != store.store_id:
            raise RuntimeError(
                f"store {p} was replaced during the run (store_id {row[0] if row else None!r}, "
                f"expected {store.store_id!r}); rerun to recompute"
            )
        yield con
    finally:
        con.close()


def fingerprint(con: duckdb.DuckDBPyConnection, table: str, key: str, columns: list[str]) -> str:
    """Order-independent content hash of one key partition of a stage table.

    `table` and `columns` are identifiers written in the code, never user input.
    """
    if not re.match(r"^[a-z_][a-z0-9_]*$", table) or not all(re.match(r"^[a-z_][a-z0-9_]*$", c) for c in columns):
        raise ValueError(f"bad identifier in fingerprint({table!r}, {columns!r})")
    cols = ", ".join(columns)
    n, h = con.execute(
        f"select count(*), coalesce(bit_xor(hash({cols})), 0) from {table} where key = ?", [key]
    ).fetchone()
    return f"{n}:{h:016x}"


def make_ref(con: duckdb.DuckDBPyConnection, stage: str, key: str, store: StoreRef, table: str,
             columns: list[str]) -> StageRef:
    """Reference to a freshly written partition, with row count and content fingerprint."""
    fp = fingerprint(con, table, key, columns)
    return StageRef(stage=stage, key=key, store=store, rows=int(fp.split(":")[0]), fingerprint=fp)


def insert_frame(con: duckdb.DuckDBPyConnection, name: str, frame: Any, params: dict[str, Any]) -> None:
    """Run sql/<name>.sql with `frame` (a polars DataFrame or arrow Table) visible as `batch`."""
    con.register("batch", frame.to_arrow() if isinstance(frame, pl.DataFrame) else frame)
    try:
        run_sql(con, name, params)
    finally:
        con.unregister("batch")


def create_views(con: duckdb.DuckDBPyConnection, name: str, files: list[str]) -> None:
    """Run sql/<name>.sql: `create or replace view` statements over the Parquet files `files`.

    A view cannot hold a bound parameter, so `$files` is written into the statement as a list literal of
    quoted strings (quotes doubled: the paths are data, never SQL); no other parameter is allowed.
    """
    if not files:
        raise ValueError(f"sql/{name}.sql: no files to create views over")
    literal = "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"
    for stmt in _split_statements(load_sql(name)):
        if re.search(r"\$(?!files\b)[a-z_]", stmt):
            raise ValueError(f"sql/{name}.sql: a view takes only $files, got {stmt!r}")
        con.execute(stmt.replace("$files", literal))


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """All of a stage's writes in one transaction: a failure leaves the previous partition intact."""
    con.begin()
    try:
        yield con
    except BaseException:
        con.rollback()
        raise
    con.commit()
