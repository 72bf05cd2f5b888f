"""Shards: bounded doc_idx ranges of a stage's input, run in parallel and resumed after a crash.

The per-document stages (dedup, featurize, score) cut the pool into shards of at most
`run.shard_docs` documents. For each shard the stage task (in the flow's process, the only one
that writes the DuckDB store) exports the shard's inputs from the store to a Parquet part,
submits one shard task to the flow's task runner (threads, local processes, a Dask or a Ray
cluster), and, as each shard task finishes, loads its output part into the stage's tables and
records the shard in `shard_done`, both in one transaction. A stage may instead keep the part as
it is (`keep_part`: moved into `<store>.data/<stage>/key=K/role=R/`, downloaded from an object
store) and read it in place through views over the recorded parts (`point_views`); dedup,
featurize and score do, so the flow's process loads none of their rows. A shard task reads only
parts and writes only its own output part, so it can run on any machine that reaches the parts: a local
or shared directory, or an s3:// prefix (`run.parts`), where workers need no shared file system.

A part is whole or absent: on a file system it is written to a temporary name and renamed, on an
object store it is uploaded (and verified) in one object, which S3 makes visible only complete.

Shared inputs: dedup, featurize and score all read the same thing, each shard's texts. Those are
exported once per ingest partition and shard into `texts-<docs key>` (`text_parts`,
`export_texts`) and read there by all three; the flow removes them once the score stage has run
(`Parts.clean`). Each stage exports a shard's texts only when no complete part holds them.

Resume: a rerun of the stage skips the shards that `shard_done` records for the stage's key,
loads output parts that were finished but not yet recorded (killed between the two), and
recomputes only the rest. Loading deletes the shard's doc_idx range before inserting, so a shard
is never counted twice. Parts are deleted once the stage's partition is complete.

Layout of the parts (under `run.parts`, default `<store>.parts/`):
    texts-<docs key>/in-<role>-<lo>-<hi>.parquet  shard texts (doc_idx, text), shared by the stages
    <stage>-<key>/in-<role>-<lo>-<hi>.parquet     a stage's own inputs, if it exports any (run_shards
                                                  without `inputs`; deleted once the shard is loaded)
    <stage>-<key>/out-<role>-<lo>-<hi>.parquet    outputs written by shard tasks
    <stage>-<key>/...                             fitted state the shard tasks load (e.g. lsa.npz)
and of the kept parts (always local, beside the store, part of it: move or delete them with it):
    <store>.data/<stage>/key=<key>/role=<role>/<lo>-<hi>.parquet
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import multiprocessing.util
import os
import pickle
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from quadflow import objectstore as ob
from quadflow.log import get_logger
from quadflow.objectstore import ObjectStoreError, ObjectStoreSettings
from quadflow.settings import ConfigError, RunSettings
from quadflow.store import capped_memory, create_views, query_sql, run_sql, transaction


@dataclass(frozen=True)
class Shard:
    """Documents lo <= doc_idx < hi of one role of a stage's input."""

    role: str
    lo: int
    hi: int

    @property
    def name(self) -> str:
        return f"{self.role}-{self.lo:012d}-{self.hi:012d}"

    @property
    def docs(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class ShardResult:
    """What a shard task hands back: where its output part is and how long it took (and, for stages that
    need it, what else the task found out, JSON-serializable)."""

    shard: Shard
    path: str
    rows: int
    seconds: float
    worker: str
    info: dict[str, Any] | None = None


def plan_shards(counts: dict[str, int], shard_docs: int) -> list[Shard]:
    """Consecutive doc_idx ranges of at most shard_docs documents per role, in role order."""
    if shard_docs < 1:
        raise ValueError(f"shard_docs must be >= 1, got {shard_docs!r}")
    return [Shard(role, lo, min(lo + shard_docs, n)) for role, n in counts.items() for lo in range(0, n, shard_docs)]


# Range partitioning by hash (ingest's exact dedup, dedup's candidate join): a stage whose keys are uniform
# hashes cuts their space into ranges, each shard task reads one range from every part (parts sorted by the
# key, so only the row groups that overlap it), and no process holds or scans every key of the pool.
RANGE_SHARD_DOCS = 8  # a range task covers run.shard_docs x this many documents (a key costs far less than one)
# At most this many ranges: whoever reads the ranges' outputs back holds one open part per range, and a task
# holds more keys beyond that (about 4M documents' worth at a billion).
MAX_HASH_RANGES = 256


def hash_range(i: int, ranges: int, space: int) -> tuple[int, int]:
    """The values lo <= h < hi of range `i` of `ranges` that tile [0, space)."""
    return i * space // ranges, (i + 1) * space // ranges


def hash_ranges(docs: int, shard_docs: int) -> int:
    """How many range tasks share the keys of `docs` documents: each covers about RANGE_SHARD_DOCS x
    shard_docs documents, within 1..MAX_HASH_RANGES."""
    return min(MAX_HASH_RANGES, max(1, -(-docs // (RANGE_SHARD_DOCS * shard_docs))))


def write_parquet_atomic(path: Path, batches: Iterable[pa.RecordBatch | pa.Table], schema: pa.Schema | None = None,
                         compression: str = "zstd") -> int:
    """Write batches to `path` via a temporary file renamed into place: a reader never sees half a part.

    Returns the number of rows written. A crash leaves at most a `.tmp-*` file, which is ignored.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    rows = 0
    writer = None
    try:
        for batch in batches:
            if writer is None:
                writer = pq.ParquetWriter(tmp, schema or batch.schema, compression=compression)
            table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
            writer.write_table(table)
            rows += table.num_rows
        if writer is None:
            if schema is None:
                raise ValueError(f"no rows and no schema for part {path}")
            writer = pq.ParquetWriter(tmp, schema, compression=compression)
        writer.close()
        writer = None
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    return rows


def part_rows(path: Path) -> int | None:
    """Rows of a complete part, or None when it is missing or unreadable (truncated, not Parquet)."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return None


class Parts:
    """Where one stage partition's parts live: a local (or shared) directory, or an s3:// prefix.

    Every method takes a part's location as `url(name)` spells it. Shard tasks get the Parts (it
    pickles without its client; each process makes its own from `objectstore`, credentials from the
    standard AWS chain of the machine it runs on).
    """

    def __init__(self, root: str | os.PathLike[str], objectstore: ObjectStoreSettings | None = None,
                 owned_parent: bool = False):
        root = str(root)
        self.remote = ob.is_s3(root)
        self.root = root.rstrip("/") if self.remote else root
        self.objectstore = objectstore
        # clean() removes the local parent directory too once it is empty (`<store>.parts`, which quadflow
        # made; never a directory the user named)
        self.owned_parent = owned_parent and not self.remote
        self._client: ob.ObjectStoreClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def __repr__(self) -> str:
        return f"Parts({self.root!r})"

    @property
    def client(self) -> ob.ObjectStoreClient:
        if self._client is None:
            self._client = ob.client(self.objectstore)
        return self._client

    def url(self, name: str) -> str:
        return f"{self.root}/{name}" if self.remote else str(Path(self.root) / name)

    def input(self, shard: Shard) -> str:
        return self.url(f"in-{shard.name}.parquet")

    @staticmethod
    def beside(output_url: str, what: str) -> str:
        """Another file a shard task writes beside its output part: `out-<shard>` becomes `<what>-<shard>`."""
        head, _, name = output_url.rpartition("out-")
        return f"{head}{what}-{name}"

    def output(self, shard: Shard) -> str:
        return self.url(f"out-{shard.name}.parquet")

    def check(self) -> None:
        """Fail fast, naming the bucket, when an s3:// parts prefix cannot be listed."""
        if self.remote:
            ob.check_access(self.client, self.root + "/")

    def write_parquet(self, url: str, batches: Iterable[pa.RecordBatch | pa.Table], schema: pa.Schema | None = None,
                      compression: str = "zstd") -> int:
        """Write a part whole (see write_parquet_atomic); returns its rows."""
        rows = []
        self.save(url, lambda path: rows.append(write_parquet_atomic(path, batches, schema, compression)))
        return rows[0]

    def save(self, url: str, write: Callable[[Path], None]) -> None:
        """Store a file `write(path)` creates (a part, fitted state for the shard tasks) at `url`: in place,
        or written aside and uploaded as one object, visible only once complete (size and ETag checked)."""
        if not self.remote:
            write(Path(url))
            return
        with tempfile.TemporaryDirectory(prefix="quadflow-part-") as tmp:
            local = Path(tmp) / url.rsplit("/", 1)[-1]
            write(local)
            ob.upload_file(self.client, local, url)

    def put(self, url: str, src: Path, columns: list[str]) -> None:
        """Make the Parquet file `src` a part at `url`, whole or not at all: locally a hard link (no copy; a
        copy across file systems), so deleting the part leaves `src`; on an object store its `columns`, uploaded."""
        if self.remote:
            self.write_parquet(url, [pq.read_table(src, columns=columns)])
            return
        dest = Path(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{uuid.uuid4().hex}-{dest.name}")
        try:
            try:
                os.link(src, tmp)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def save_pickle(self, url: str, obj: Any) -> None:
        """Pickle `obj` (fitted state for the shard tasks) to `url`, whole or not at all (see `save`)."""
        def write(path: Path) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
            try:
                with open(tmp, "wb") as fh:
                    pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        self.save(url, write)

    def load_pickle(self, url: str) -> Any:
        """What `save_pickle` stored at `url` (downloaded once per process from an object store, see `local`)."""
        with open(self.local(url), "rb") as fh:
            return pickle.load(fh)

    def exists(self, url: str) -> bool:
        return ob.exists(self.client, url) if self.remote else Path(url).is_file()

    def rows(self, url: str) -> int | None:
        """Rows of a complete part, or None when it is missing or unreadable (see part_rows)."""
        if not self.remote:
            return part_rows(Path(url))
        try:
            with ob.open_read(self.client, url) as fh:  # ranged reads of the footer only
                return pq.ParquetFile(fh).metadata.num_rows
        except ObjectStoreError as err:
            if err.code == "NoSuchKey":
                return None
            raise
        except pa.ArrowInvalid:
            return None

    def iter_batches(self, url: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
        """A part's rows in batches of at most batch_rows (memory bounded by the batch, not the part)."""
        with self._readable(url) as path:
            yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows)

    def read_table(self, url: str, columns: list[str] | None = None) -> pa.Table:
        with self._readable(url) as path:
            return pq.read_table(path, columns=columns)

    def read_range(self, url: str, column: str, lo: int, hi: int, columns: list[str] | None = None) -> pa.Table:
        """The rows with lo <= `column` < hi of a part sorted by that integer column, reading only the row
        groups whose statistics overlap the range (on an object store, ranged reads of those bytes only)."""
        if columns is not None and column not in columns:
            raise ValueError(f"read_range: columns {columns} of {url} must include the range column {column!r}")
        with (ob.open_read(self.client, url) if self.remote else open(url, "rb")) as src:
            pf = pq.ParquetFile(src)
            at = pf.schema_arrow.get_field_index(column)
            groups = []
            for g in range(pf.num_row_groups):
                stats = pf.metadata.row_group(g).column(at).statistics
                if stats is None or not stats.has_min_max or (stats.min < hi and stats.max >= lo):
                    groups.append(g)
            schema = pf.schema_arrow if columns is None else pa.schema([pf.schema_arrow.field(c) for c in columns])
            table = pf.read_row_groups(groups, columns=columns) if groups else schema.empty_table()
        values = table[column]
        keep = pc.greater_equal(values, pa.scalar(lo, values.type))  # typed: a uint64 bound may exceed int64
        if hi <= _int_max(values.type):  # a range that ends at the type's end (2^64 for uint64) has no top bound
            keep = pc.and_(keep, pc.less(values, pa.scalar(hi, values.type)))
        return table.filter(keep)

    def local(self, url: str) -> Path:
        """A local path holding the file at `url`: itself, or a copy kept for this process (keyed by ETag,
        so a worker that runs many shards downloads fitted state once). Only the latest copy is kept:
        a stage's shards all load the same file."""
        if not self.remote:
            return Path(url)
        info = ob.head(self.client, url)
        digest = hashlib.sha256(f"{url}\0{info.etag}".encode()).hexdigest()[:16]
        path = _cache_dir() / f"{digest}-{url.rsplit('/', 1)[-1]}"
        if not path.is_file():
            for old in path.parent.iterdir():
                old.unlink(missing_ok=True)
            tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
            try:
                self._download(url, tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return path

    def delete(self, url: str) -> None:
        if self.remote:
            ob.delete(self.client, url)
        else:
            Path(url).unlink(missing_ok=True)

    def clean(self) -> None:
        """Remove every part (everything is in the store now), and any upload a killed run left open."""
        if not self.remote:
            shutil.rmtree(self.root, ignore_errors=True)
            if self.owned_parent:
                try:
                    os.rmdir(Path(self.root).parent)
                except OSError:  # not empty: other stages' parts (the shards' texts) are still in use
                    pass
            return
        bucket, prefix = ob.parse(self.root + "/")
        for item in ob.list_prefix(self.client, bucket, prefix):
            ob.delete(self.client, item.url)
        ob.abort_incomplete_uploads(self.client, self.root + "/")

    @contextmanager
    def _readable(self, url: str) -> Iterator[str]:
        """A local path of the part at `url` while the block runs: itself, or a temporary download."""
        if not self.remote:
            yield url
            return
        with tempfile.TemporaryDirectory(prefix="quadflow-part-") as tmp:
            local = Path(tmp) / "part.parquet"
            self._download(url, local)
            yield str(local)

    def _download(self, url: str, path: Path) -> None:
        with ob.open_read(self.client, url) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 * 1024 * 1024)


def _int_max(t: pa.DataType) -> int:
    if not pa.types.is_integer(t):
        raise TypeError(f"read_range: the range column must be an integer column, not {t}")
    return 2 ** (t.bit_width - (0 if pa.types.is_unsigned_integer(t) else 1)) - 1


_CACHE: list[tuple[Path, int]] = []


def _cache_dir() -> Path:
    """This process's directory for copies of remote fitted state; removed when the process exits
    (atexit, and multiprocessing's finalizers for pool workers, which leave without running atexit)."""
    if not _CACHE or _CACHE[0][1] != os.getpid():
        path = Path(tempfile.mkdtemp(prefix="quadflow-parts-cache-"))
        atexit.register(shutil.rmtree, path, True)
        multiprocessing.util.Finalize(None, shutil.rmtree, args=(path, True), exitpriority=0)
        _CACHE[:] = [(path, os.getpid())]
    return _CACHE[0][0]


def stage_parts(run: RunSettings, store_path: str, stage: str, key: str,
                objectstore: ObjectStoreSettings | None = None) -> Parts:
    """The parts of one stage partition: under `run.parts` (a directory or an s3:// prefix), default
    `<store>.parts/`; `objectstore` says where an s3:// prefix's endpoint is."""
    root = run.parts or f"{store_path}.parts"
    if ob.is_s3(root):
        return Parts(f"{root.rstrip('/')}/{stage}-{key}", objectstore)
    return Parts(Path(root) / f"{stage}-{key}", owned_parent=not run.parts)


def text_parts(run: RunSettings, store_path: str, docs_key: str,
               objectstore: ObjectStoreSettings | None = None) -> Parts:
    """Where the shard texts of ingest partition `docs_key` are exported once for every stage that reads them."""
    return stage_parts(run, store_path, "texts", docs_key, objectstore)


# Text parts are written by the flow's process, one per shard of the pool: LZ4 wrote a 50,000-document shard's
# texts in 0.13 s of CPU where zstd took 0.30 s, for parts a third larger; a whole run's flow process spent about
# 2% less, within noise (BENCHMARKS.md, "Dedup's candidate join in shard tasks"). What shard tasks write stays zstd.
TEXTS_COMPRESSION = "lz4"


def export_texts(con: Any, docs_key: str, texts: Parts) -> Callable[[Shard, str], None]:
    """run_shards' export_input for text parts: the shard's (doc_idx, text) rows, in doc_idx order."""
    def export(shard: Shard, url: str) -> None:
        # Under the lower cap: DuckDB keeps the blocks it reads cached up to its cap, so exporting every
        # shard's texts grew the flow process with the pool (576 MB held after reading 4M synthetic texts
        # under 1 GB, 220 MB under 256 MB, for the same CPU).
        with capped_memory(con):
            reader = query_sql(con, "shard_texts_range", {"key": docs_key, "role": shard.role, "lo": shard.lo,
                                                              "hi": shard.hi}).fetch_record_batch(10_000)
            texts.write_parquet(url, reader, schema=reader.schema, compression=TEXTS_COMPRESSION)
    return export


# ---------------------------------------------------------------------------------------------
# Output parts kept as the store's data (read in place through views, not loaded)
# ---------------------------------------------------------------------------------------------


def data_root(store_path: str) -> Path:
    """Where a store keeps the Parquet parts its views read: `<store>.data/`, beside the DuckDB file."""
    return Path(f"{store_path}.data")


def data_part(store_path: str, stage: str, key: str, shard: Shard) -> Path:
    """The kept output part of one shard, hive-partitioned by key and role so a view's filters skip whole files."""
    name = f"{shard.lo:012d}-{shard.hi:012d}.parquet"
    return data_root(store_path) / stage / f"key={key}" / f"role={shard.role}" / name


def keep_part(parts: Parts, url: str, dest: Path) -> None:
    """Move a finished output part to `dest` in the store's data directory, whole or not at all.

    A local part is renamed (copied when `run.parts` is on another file system); a part on an object
    store is downloaded, since DuckDB reads the data directory in place and cannot reach s3:// here.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not parts.remote:
        try:
            os.replace(url, dest)
            return
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise
    tmp = dest.with_name(f".tmp-{uuid.uuid4().hex}-{dest.name}")
    try:
        if parts.remote:
            parts._download(url, tmp)
        else:
            shutil.copyfile(url, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    parts.delete(url)


def kept_parts(con: Any, stage: str, store_path: str) -> list[str]:
    """The kept parts of every recorded shard of `stage` (all partitions), in (key, role, lo) order.

    Only what the ledger records: a part moved in by a run killed before it recorded the shard, or
    one left by a plan with other shard bounds, is not read.
    """
    run_sql(con, "shards_create")
    rows = query_sql(con, "shards_stage", {"stage": stage}).fetchall()
    paths = [data_part(store_path, stage, key, Shard(role, int(lo), int(hi))) for key, role, lo, hi in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {stage} stage's recorded parts are missing from "
                                f"{data_root(store_path)}, e.g. {missing[0]}: the store's data directory was moved "
                                f"or deleted apart from the store; move it back, or delete the store to recompute")
    return [str(p) for p in paths]


def keep_outputs(stage: str, key: str, parts: Parts, store_path: str, info_meta: str | None = None
                 ) -> Callable[[Any, ShardResult], str | None]:
    """run_shards' `load` for a stage whose output parts are its data: each part is kept as it is (keep_part).

    `info_meta`: the key of the part's Parquet metadata that holds the shard's info (JSON text, e.g. each
    scorer's counts), returned for the ledger; read from the kept local copy, so a part that a killed run
    finished has its info too, and an s3:// part is not downloaded twice."""
    def load(con: Any, result: ShardResult) -> str | None:
        kept = data_part(store_path, stage, key, result.shard)
        keep_part(parts, result.path, kept)
        if info_meta is None:
            return None
        meta = pq.read_schema(kept).metadata or {}
        if info_meta.encode() not in meta:
            raise ValueError(f"{stage} part {kept} has no {info_meta!r} metadata")
        return meta[info_meta.encode()].decode()
    return load


def point_views(con: Any, stage: str, views: str, store_path: str) -> None:
    """Rewrite sql/<views>.sql's views over every recorded part of `stage` (call in the transaction that
    completes a partition; the stage has at least that partition's parts)."""
    create_views(con, views, kept_parts(con, stage, store_path))


def drop_loaded_table(con: Any, stage: str, table: str) -> bool:
    """Make way for a view: in a store written when `stage`'s outputs were loaded into rows, `table` is a
    table; drop it and forget the stage's shard ledger, so every shard is computed again as a kept part.
    Returns whether there was such a table."""
    run_sql(con, "shards_create")
    if query_sql(con, "shards_loaded_table", {"name": table}).fetchone() is None:
        return False
    if not re.fullmatch(r"[a-z_]+", table):
        raise ValueError(f"bad table name {table!r}")
    with transaction(con):
        con.execute(f"drop table {table}")  # an identifier from the code (checked above), never user input
        run_sql(con, "shards_forget_stage", {"stage": stage})
    get_logger().info(f"{stage}: dropped table {table} of an older quadflow version (its shards are computed again "
                      f"and read in place)")
    return True


def forget_unusable_shards(con: Any, stage: str, key: str, shards: list[Shard], store_path: str) -> int:
    """Drop the ledger rows (and kept parts) of a stage partition's shards that this run cannot use, so they
    are computed again: shards outside `shards` (an earlier run cut the partition with another
    `run.shard_docs`; their rows would be read twice) and shards whose kept part is missing.
    Returns how many were dropped (and logs it)."""
    plan = {(s.role, s.lo, s.hi) for s in shards}
    stale = [Shard(*s) for s in sorted(done_shards(con, stage, key))
             if s not in plan or not data_part(store_path, stage, key, Shard(*s)).is_file()]
    for shard in stale:
        with transaction(con):
            run_sql(con, "shards_forget", {"stage": stage, "key": key, "role": shard.role, "lo": shard.lo,
                                           "hi": shard.hi})
        data_part(store_path, stage, key, shard).unlink(missing_ok=True)
    if stale:
        get_logger().info(f"{stage}: {len(stale)} recorded shards are computed again (cut with another "
                          f"run.shard_docs, or their part is missing)")
    return len(stale)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------------------------------------
# Store records
# ---------------------------------------------------------------------------------------------


def done_shards(con: Any, stage: str, key: str) -> set[tuple[str, int, int]]:
    """(role, lo, hi) of a stage partition's shards already recorded (loaded into the store or kept as parts)."""
    run_sql(con, "shards_create")
    return {(r, int(lo), int(hi)) for r, lo, hi in query_sql(con, "shards_done", {"stage": stage, "key": key}).fetchall()}


def record_shard(con: Any, stage: str, key: str, result: ShardResult, source: str, info: str | None) -> None:
    """Mark a shard loaded (same transaction as its rows); `source` says how: computed or recovered;
    `info` is what the stage keeps per shard (JSON text, e.g. each scorer's counts)."""
    s = result.shard
    run_sql(con, "shards_record", {"stage": stage, "key": key, "role": s.role, "lo": s.lo, "hi": s.hi,
                                   "rows": result.rows, "seconds": result.seconds, "worker": result.worker,
                                   "source": source, "info": info})


def shard_infos(con: Any, stage: str, key: str) -> list[str]:
    """The `info` JSON texts of a stage partition's loaded shards, in doc_idx order."""
    return [r[0] for r in query_sql(con, "shards_info", {"stage": stage, "key": key}).fetchall() if r[0] is not None]


# ---------------------------------------------------------------------------------------------
# Running shards
# ---------------------------------------------------------------------------------------------


@dataclass
class ShardRun:
    """Counts of one stage's shard work, for logs and for the resume benchmark."""

    total: int = 0
    skipped: int = 0  # already recorded in the store
    recovered: int = 0  # output part finished by an earlier, killed run: loaded, not recomputed
    computed: int = 0
    docs_computed: int = 0
    docs_skipped: int = 0

    def summary(self) -> str:
        return (f"{self.total} shards: {self.computed} computed ({self.docs_computed:,} docs), "
                f"{self.skipped} already done, {self.recovered} recovered from finished parts "
                f"({self.docs_skipped:,} docs not recomputed)")


def run_shards(
    con: Any,
    stage: str,
    key: str,
    shards: list[Shard],
    parts: Parts,
    export_input: Callable[[Shard, str], None] | None,
    shard_task: Any,
    task_kwargs: dict[str, Any],
    load: Callable[[Any, ShardResult], str | None],
    progress: Any = None,
    rows_per_doc: int = 1,
    inputs: Parts | None = None,
) -> ShardRun:
    """Compute the shards not yet done and load each as it finishes; see the module docstring.

    `export_input(shard, url)` writes a shard's input part (skipped when a complete one exists): into
    `inputs` when given (shared with other stages, e.g. `text_parts`: kept after the shard loads),
    else into the stage's own `parts` (deleted once the shard is loaded); `shard_task` is a Prefect task whose
    `.fn(shard, input_url, output_url, parts=parts, **task_kwargs)` returns a ShardResult;
    `load(con, result)` inserts the output part's rows (read with `parts.read_table`, inside the
    transaction that also records the shard) and returns the shard's info (JSON text) or None.
    """
    log = get_logger()
    stats = ShardRun(total=len(shards))
    done = done_shards(con, stage, key)
    todo: list[Shard] = []
    for shard in shards:
        if (shard.role, shard.lo, shard.hi) in done:
            stats.skipped += 1
            stats.docs_skipped += shard.docs
            _progress(progress, shard.docs)
            continue
        out = parts.output(shard)
        rows = parts.rows(out)
        if rows == shard.docs * rows_per_doc:  # finished by a killed run: load it, do not recompute
            _load(con, stage, key, parts, load, ShardResult(shard, out, rows, 0.0, "recovered"), "recovered",
                  rows_per_doc)
            stats.recovered += 1
            stats.docs_skipped += shard.docs
            _progress(progress, shard.docs)
            continue
        todo.append(shard)
    if stats.skipped or stats.recovered:
        log.info(f"{stage}: resuming: {stats.skipped} shards already in the store, {stats.recovered} loaded from "
                 f"finished parts, {len(todo)} to compute")

    source = parts if inputs is None else inputs
    prepare = input_preparer(source, export_input)
    for result in execute_shards(shard_task, todo, parts, task_kwargs, prepare, inputs=source):
        _load(con, stage, key, parts, load, result, "computed", rows_per_doc, drop_input=inputs is None)
        stats.computed += 1
        stats.docs_computed += result.shard.docs
        _progress(progress, result.shard.docs)
    return stats


def input_preparer(source: Parts, export_input: Callable[[Shard, str], None] | None) -> Callable[[Shard], None]:
    """execute_shards' `prepare`: write a shard's input part into `source` with `export_input(shard, url)`, just
    before the shard is submitted, unless a complete one is there (a killed run's, or an earlier pass's)."""
    def prepare(shard: Shard) -> None:
        if export_input is not None:
            url = source.input(shard)
            if source.rows(url) != shard.docs:
                export_input(shard, url)
    return prepare


def _progress(progress: Any, n: int) -> None:
    if progress is not None:
        progress.update(n)


def _load(con: Any, stage: str, key: str, parts: Parts, load: Callable[[Any, ShardResult], str | None],
          result: ShardResult, source: str, rows_per_doc: int, drop_input: bool = True) -> None:
    rows = parts.rows(result.path)
    if rows != result.shard.docs * rows_per_doc:
        raise RuntimeError(f"{stage} part {result.path} holds {rows} rows for shard {result.shard.name} "
                           f"({result.shard.docs} documents x {rows_per_doc})")
    with transaction(con):
        info = load(con, result)
        record_shard(con, stage, key, result, source, info)
    # its own input is no longer needed (shared inputs stay for the other stages); the output part stays
    # until the stage completes (Parts.clean)
    if drop_input:
        parts.delete(parts.input(result.shard))


def execute_shards(shard_task: Any, todo: list[Shard], parts: Parts, kwargs: dict[str, Any],
                   prepare: Callable[[Shard], None] = lambda shard: None,
                   inputs: Parts | None = None) -> Iterator[Any]:
    """Shard results as they finish (what the shard task returns: a ShardResult, or e.g. cluster's pass-1
    sums): on the flow's task runner inside a flow run, else one by one here.

    Each shard's input (in `inputs`, default `parts`) is prepared just before it is submitted, so
    workers start while later inputs are still being exported. A single shard runs in this process:
    starting workers would cost more than it saves.
    """
    source = parts if inputs is None else inputs
    args = [(s, source.input(s), parts.output(s)) for s in todo]
    kwargs = {**kwargs, "parts": parts}
    if len(args) > 1 and _in_flow_run():
        from prefect.futures import as_completed

        futures = []
        try:
            for s, i, o in args:
                prepare(s)
                futures.append(shard_task.submit(s, i, o, **kwargs))
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            for fut in futures:  # a failure: do not leave shards running behind our back
                if not fut.state.is_final():
                    fut.wait()
        return
    for s, i, o in args:
        prepare(s)
        yield shard_task.fn(s, i, o, **kwargs)


def _in_flow_run() -> bool:
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


# ---------------------------------------------------------------------------------------------
# Task runners
# ---------------------------------------------------------------------------------------------

RUNNER_HELP = ("threads, processes (default: a local process pool), dask (a local Dask cluster of worker "
               "processes), dask://HOST:PORT (an existing Dask scheduler), ray (the Ray cluster RAY_ADDRESS names, "
               "else a local Ray instance) or ray://HOST:PORT (a Ray cluster through Ray Client)")


def task_runner(run: RunSettings):
    """The Prefect task runner that runs shard tasks, from `run.runner` (see RUNNER_HELP)."""
    spec, workers = run.runner, run.workers
    if spec == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if spec == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers)
    if spec == "dask" or spec.startswith(("dask://", "tcp://")):
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ConfigError(f"run.runner = {spec!r} needs prefect-dask: pip install -e '.[dask]'") from None
        if spec == "dask":
            return DaskTaskRunner(cluster_kwargs={"n_workers": workers or os.cpu_count() or 1, "processes": True,
                                                  "threads_per_worker": 1, "dashboard_address": None})
        return DaskTaskRunner(address="tcp://" + spec.split("://", 1)[1])
    if spec == "ray" or spec.startswith("ray://"):
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ConfigError(f"run.runner = {spec!r} needs prefect-ray: pip install -e '.[ray]'") from None
        if spec.startswith("ray://"):  # Ray Client: the run's process need not be on the cluster
            return RayTaskRunner(address=spec)
        if os.environ.get("RAY_ADDRESS"):  # the cluster this machine belongs to (`ray start`, a Ray job)
            return RayTaskRunner(address=os.environ["RAY_ADDRESS"])
        # a local Ray instance the run starts and stops; each shard task takes one of its CPUs
        return RayTaskRunner(init_kwargs={"num_cpus": workers or os.cpu_count() or 1, "include_dashboard": False})
    raise ConfigError(f"run.runner = {spec!r}: expected {RUNNER_HELP}")


def check_flow_runner(run: RunSettings) -> None:
    """Warn when the flow run's task runner is not the one `run.runner` names (a direct `curate(...)` call
    uses the flow's default; `quadflow.flows.curate.run_curate`, the CLI and the partition flows apply the setting)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None:
        return
    want, have = type(task_runner(run)).__name__, type(ctx.task_runner).__name__
    if want != have:
        get_logger().warning(f"run.runner = {run.runner!r} asks for {want}, but this flow run's shard tasks run on "
                             f"{have}: start it with quadflow.flows.curate.run_curate(settings) (as the CLI does)")
