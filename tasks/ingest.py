"""Ingest: read raw files and s3:// objects into the store with stable ids and token counts,
exact-dedup them, and quarantine every record that cannot be a document, with its location
and a reason.

Core (no Prefect, no DuckDB): `expand_inputs`, `list_inputs`, `resolve_files`,
`fingerprint_files`, `read_file`, `read_object`, `doc_id`, `Deduplicator` (exact dedup in
memory, the reference), `sorted_ids`/`first_copies` (the same, by hash range), `choose_base`,
`plan_increment`. Task: `ingest`, which writes ingest_docs, ingest_quarantine,
ingest_duplicates, ingest_files, ingest_objects and ingest_runs for one key.

Inputs are parsed by shard tasks on the flow's task runner (`ingest_read`, one per input: JSON,
validation, ids and token counts, into a Parquet part of documents, one of quarantined records
and one of ids sorted by hash, under `run.parts`). Exact duplicates are then found by shard
tasks too (`ingest_dedup`, one per range of the hash: every input's ids in that range, and
those of the documents the partition already holds), so no process holds or scans every id.
The flow's process loads the parts in input order, leaving out the dropped copies, and commits
each input with its `shard_done` row. The load order (pool inputs, then targets, each in input
order; lines in file order), not the order of parsing, decides which copy of a document is
kept, so the partition is the same however many workers parse or hash ranges there are.

A broken container (missing file, corrupt gzip/zstd stream, Parquet without the text column)
is an input error and stops the run; a broken record is a data error and is quarantined.

Incremental ingestion. Every partition records its inputs (path or URL, size, content
identity) in ingest_objects. A run whose inputs differ from an earlier partition's (same
ingest settings) builds on the one that shares the most bytes of unchanged inputs, its base:

- the rows of unchanged inputs are copied from the base, in the base's order, with doc_idx
  renumbered densely (0..n-1 per role);
- new and changed inputs are read and appended after them (doc_idx continues), deduplicated
  against everything already kept; the rows of changed and removed inputs are dropped;
- an unchanged input is read again too when one of its duplicates pointed at a copy in a
  changed or removed input (so a document never disappears with the copy it duplicated).

The partition's key hashes the ingest settings, every input's identity and the base's key,
so it changes whenever the set of inputs does, and everything downstream recomputes. A run
whose inputs equal an existing partition's reuses that partition as is.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import json
import os
import re
import tempfile
import time
import unicodedata
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import polars as pl
import zstandard
from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from quadflow import objectstore as ob
from quadflow.log import Progress, get_logger
from quadflow.objectstore import ObjectStoreError, ObjectStoreIOError, ObjectStoreSettings
from quadflow.settings import ConfigError, IngestSettings, RunSettings
from quadflow.store import (
    StageRef, StoreRef, connect, insert_frame, make_ref, query_sql, run_sql, stage_key, transaction,
)
from quadflow.shards import (Parts, Shard, ShardResult, execute_shards, hash_range, hash_ranges, record_shard,
                             stage_parts, worker_name)
from quadflow.tasking import IO_RETRIES, stage_task, transient_failure
from quadflow.text import count_tokens_expr

VERSION = "ingest-2"  # 2: records nested deeper than MAX_DEPTH are quarantined (too_deep)
ROLES = ("pool", "target")
REASONS = (
    "malformed_json", "not_an_object", "too_deep", "missing_text", "wrong_type", "empty_text", "undecodable",
    "oversize",
)
# Deepest nesting of arrays/objects a record may have. Python's json.dumps recurses per level and fails near
# its recursion limit (1000, less the caller's stack), so a record ~975 deep would parse here and then break
# every JSONL export; 128 is serde_json's default limit and far beyond what any corpus record needs.
MAX_DEPTH = 128

_JSON_EXTS = (".jsonl", ".json", ".ndjson")
_COMPRESSIONS = {"": None, ".gz": "gzip", ".zst": "zstd"}
_CHUNK = 1 << 20  # bytes read from disk (or decompressed) per step
_EXCERPT_CHARS = 200
_MISSING = object()
# Built once: json.dumps with options builds a new encoder on every call.
_to_json = json.JSONEncoder(ensure_ascii=False, default=str).encode

DOC_SCHEMA = {
    "role": pl.String, "text": pl.String, "source_id": pl.String, "source": pl.String, "file": pl.String,
    "line": pl.Int64, "fields": pl.String, "n_chars": pl.Int64, "n_tokens": pl.Int64, "doc_id": pl.String,
}
BAD_SCHEMA = {
    "role": pl.String, "file": pl.String, "line": pl.Int64, "reason": pl.String, "detail": pl.String,
    "excerpt": pl.String,
}
# A date partition is a path segment `date=YYYY-MM-DD` (Hive-style, as Spark/Athena/Glue write them).
_DATE_SEGMENT = re.compile(r"(?:^|/)date=(\d{4}-\d{2}-\d{2})(?=/)")


class InputError(ConfigError):
    """An input path or container that cannot be read at all; the message names it and why."""


# --------------------------------------------------------------------------- finding files


def file_format(path: str | Path) -> tuple[str, str | None]:
    """(kind, compression) from the file name: kind in jsonl/parquet/txt, compression gzip/zstd/None."""
    name = Path(path).name.lower()
    for suffix, comp in _COMPRESSIONS.items():
        if suffix and not name.endswith(suffix):
            continue
        stem = name[: len(name) - len(suffix)] if suffix else name
        if stem.endswith(_JSON_EXTS):
            return "jsonl", comp
        if stem.endswith(".txt"):
            return "txt", comp
        if stem.endswith(".parquet") and comp is None:
            return "parquet", None
    raise InputError(
        f"input {str(path)!r} has an unsupported extension; supported: .jsonl/.json/.ndjson and .txt "
        f"(plain, .gz or .zst) and .parquet"
    )


def _supported(path: str | Path) -> bool:
    try:
        file_format(path)
    except InputError:
        return False
    return True


def _walk(directory: str) -> list[str]:
    """Supported files under a directory, recursively; hidden files and directories are skipped."""
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(root, n) for n in names if not n.startswith(".") and _supported(n))
    return found


def _literal_dir(pattern: str) -> str:
    """The directory part of a glob before its first wildcard segment ('.' when the first segment has one)."""
    parts = pattern.split(os.sep)
    literal = []
    for part in parts[:-1]:
        if any(c in part for c in "*?["):
            break
        literal.append(part)
    if not literal:
        return "."
    return os.sep.join(literal) or os.sep


def _glob(pattern: str) -> list[str]:
    """Paths a glob matches; `**` crosses directories but never follows a symlink to one.

    glob.glob(recursive=True) follows directory symlinks, so two links back to a parent make
    `d/**/*.parquet` enumerate paths without end. Here `**` walks the tree with os.walk (which does not
    follow links) from the pattern's literal directory. `*`, `?` and `[..]` stay within one segment, and,
    as in glob, wildcards skip hidden names.
    """
    if "**" not in pattern:
        return glob.glob(pattern)
    base = _literal_dir(pattern)
    prefix = "" if base == "." and not pattern.startswith("." + os.sep) else base.rstrip(os.sep) + os.sep
    rest = pattern[len(prefix):] if prefix else pattern
    regex = ob.glob_to_regex(rest.replace(os.sep, "/"))
    hits = []
    for root, dirs, names in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not os.path.islink(os.path.join(root, d)))
        rel_root = os.path.relpath(root, base).replace(os.sep, "/")
        rel_root = "" if rel_root == "." else rel_root + "/"
        for name in [*dirs, *names]:
            if not name.startswith(".") and regex.match(rel_root + name):
                hits.append(os.path.join(root, name))
    return hits


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Resolve files, directories (recursive) and globs (with **) to a sorted, de-duplicated file list.

    Directory walks and `**` never follow a symlink to a directory (a link loop cannot hang them);
    symlinks to files are read.
    """
    out: set[Path] = set()
    for pattern in patterns:
        if "://" in pattern:
            raise InputError(f"input {pattern!r}: expand_inputs lists local paths only (see list_inputs)")
        expanded = os.path.expanduser(pattern)
        if any(c in expanded for c in "*?["):
            hits = sorted(_glob(expanded))
            if not hits:
                raise InputError(f"input pattern {pattern!r} matches nothing")
            found = []
            for hit in hits:
                if os.path.isdir(hit):
                    found.extend(_walk(hit))
                elif _supported(hit):
                    found.append(hit)
            if not found:
                raise InputError(
                    f"input pattern {pattern!r} matches {len(hits)} path(s) but no file with a supported extension"
                )
        elif os.path.isdir(expanded):
            found = _walk(expanded)
            if not found:
                raise InputError(f"input directory {pattern!r} holds no file with a supported extension")
        elif os.path.exists(expanded):
            file_format(expanded)  # raises on an unsupported extension
            found = [expanded]
        else:
            raise InputError(f"input {pattern!r} does not exist")
        for f in found:
            if not os.path.isfile(f):
                raise InputError(f"input {f!r} (from {pattern!r}) is not a regular file")
            if not os.access(f, os.R_OK):
                raise InputError(f"input {f!r} (from {pattern!r}) is not readable: permission denied")
            out.add(Path(f).resolve())
    return sorted(out)


def would_read(patterns: list[str], path: str) -> str | None:
    """The first input pattern that would list `path` (a local file or s3:// URL) as an input, or None.

    Decided from names only, with the rules expand_inputs and the object listing apply (directories and
    prefixes recursively, globs segment by segment, hidden names skipped below what the pattern names), so
    it can be asked about files that do not exist yet, such as a run's own output.
    """
    for pattern in patterns:
        if ob.is_s3(path) != ob.is_s3(pattern) or not _supported(path):
            continue
        if ob.is_s3(path):
            bucket, key = ob.parse(path)
            pbucket, pkey = ob.parse(pattern)
            if bucket != pbucket:
                continue
            if any(c in pkey for c in "*?["):
                base = ob.literal_prefix(pkey).rsplit("/", 1)[0] + "/" if "/" in ob.literal_prefix(pkey) else ""
                hit = bool(ob.glob_to_regex(pkey).match(key)) and key.startswith(base)
            elif pkey == "" or pkey.endswith("/"):
                base, hit = pkey, key.startswith(pkey)
            else:
                base = pkey + "/"
                hit = key == pkey or key.startswith(base)
            if hit and (key == pkey or not any(seg.startswith(".") for seg in key[len(base):].split("/"))):
                return pattern
            continue
        target = os.path.realpath(path)
        expanded = os.path.expanduser(pattern)
        if any(c in expanded for c in "*?["):
            base = os.path.realpath(_literal_dir(os.path.abspath(expanded)))
            rest = os.path.abspath(expanded)[len(os.path.abspath(_literal_dir(os.path.abspath(expanded)))):]
            rel = os.path.relpath(target, base)
            if rel.startswith(".."):
                continue
            segs = rel.split(os.sep)
            regex = ob.glob_to_regex(rest.lstrip(os.sep).replace(os.sep, "/"))
            if not any(seg.startswith(".") for seg in segs) and any(
                    regex.match("/".join(segs[:i])) for i in range(1, len(segs) + 1)):
                return pattern  # the file itself, or a directory above it (walked), matches
            continue
        root = os.path.realpath(expanded)
        if target == root:
            return pattern
        rel = os.path.relpath(target, root)
        if not rel.startswith("..") and not any(seg.startswith(".") for seg in rel.split(os.sep)):
            return pattern
    return None


@dataclass(frozen=True)
class FileFingerprint:
    """Identity of an input's content, so the ingest key moves when the content does.

    Local files are identified by the SHA-256 of their bytes. Objects (s3:// URLs) by size and
    ETag: the store's own content identity, which changes whenever the object is rewritten with
    other content; hashing every object before reading it would read the pool twice. The SHA-256
    of an object's bytes is still computed while it is read and recorded in ingest_files.
    """

    path: str  # absolute local path, or s3:// URL
    size: int  # bytes
    mtime_ns: int  # local mtime; an object's LastModified (0 when unknown); never part of a key
    sha256: str  # local files; "" for objects
    etag: str | None = None  # objects: ETag without quotes
    version_id: str | None = None  # objects in versioned buckets, when the store reports it

    @property
    def is_object(self) -> bool:
        return ob.is_s3(self.path)

    @property
    def identity(self) -> str:
        """What incremental ingestion compares to tell an unchanged input from a changed one."""
        return f"etag:{self.etag}:{self.size}" if self.is_object else f"sha256:{self.sha256}"


def object_fingerprint(info: ob.ObjectInfo) -> FileFingerprint:
    """The fingerprint of a listed object: URL, size, ETag (and version when known)."""
    mtime = int(info.last_modified.timestamp() * 1e9) if info.last_modified is not None else 0
    return FileFingerprint(info.url, info.size, mtime, "", info.etag, info.version_id)


def fingerprint_files(paths: Iterable[str | Path]) -> tuple[FileFingerprint, ...]:
    """Size, mtime and streamed SHA-256 of each file, in the given order."""
    out = []
    for p in paths:
        path = Path(p).resolve()
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                while chunk := fh.read(_CHUNK):
                    digest.update(chunk)
        except OSError as e:
            raise InputError(f"input {str(path)!r} cannot be read: {e.strerror or e}") from None
        out.append(FileFingerprint(str(path), st.st_size, st.st_mtime_ns, digest.hexdigest()))
    return tuple(out)


def partition_date(path: str) -> date | None:
    """The date of the innermost `date=YYYY-MM-DD/` segment of a path or URL, or None."""
    found = _DATE_SEGMENT.findall(str(path).replace(os.sep, "/"))
    if not found:
        return None
    try:
        return date.fromisoformat(found[-1])
    except ValueError:
        raise InputError(f"input {str(path)!r} has a date= segment that is not a valid date") from None


def date_filter(paths: list[str], since: date | None, dates: Iterable[date] | None) -> list[str]:
    """Paths whose partition date is >= since and (when `dates` is given) one of `dates`.

    With neither filter everything is kept; with one, paths outside any date= partition are left out.
    """
    if since is None and dates is None:
        return list(paths)
    wanted = set(dates) if dates is not None else None
    out = []
    for p in paths:
        d = partition_date(p)
        if d is None or (since is not None and d < since) or (wanted is not None and d not in wanted):
            continue
        out.append(p)
    return out


def _expand_objects(c: ob.ObjectStoreClient, pattern: str) -> list[ob.ObjectInfo]:
    """Supported objects an s3:// input names; errors name the pattern, like local inputs."""
    found = ob.expand(c, pattern)
    if not found:
        raise InputError(f"input {pattern!r} matches no object")
    bucket, key = ob.parse(pattern)
    literal = len(found) == 1 and found[0].key == key
    if literal:
        file_format(found[0].key)  # raises on an unsupported extension, as for a named local file
        return found
    # as for local directories: hidden names below the pattern's prefix are skipped
    base = ob.literal_prefix(key).rsplit("/", 1)[0] if "/" in ob.literal_prefix(key) else ""
    kept = [o for o in found if _supported(o.key)
            and not any(seg.startswith(".") for seg in o.key[len(base):].split("/"))]
    if not kept:
        raise InputError(
            f"input {pattern!r} matches {len(found)} object(s) but none with a supported extension"
        )
    return kept


def list_inputs(patterns: list[str], objectstore: ObjectStoreSettings | None = None, *, role: str = "pool",
                since: date | None = None, dates: Iterable[date] | None = None,
                client: ob.ObjectStoreClient | None = None) -> list[str]:
    """Local paths and s3:// URLs the patterns name (after the date filter), without reading them.

    Local files come first (sorted), then objects (sorted by URL). Fails like `expand_inputs`
    on a pattern that matches nothing, and with ObjectStoreError on a missing or denied bucket.
    """
    return [path for path, _ in _listed(patterns, objectstore, role, since, dates, client)]


def _listed(patterns: list[str], objectstore: ObjectStoreSettings | None, role: str, since: date | None,
            dates: Iterable[date] | None, client: ob.ObjectStoreClient | None
            ) -> list[tuple[str, ob.ObjectInfo | None]]:
    """(path or URL, ObjectInfo for objects) of every input, date-filtered for the pool."""
    other = [p for p in patterns if "://" in p and not ob.is_s3(p)]
    if other:
        raise InputError(f"input {other[0]!r}: only local paths and s3:// URLs are supported")
    local_patterns = [p for p in patterns if not ob.is_s3(p)]
    remote_patterns = [p for p in patterns if ob.is_s3(p)]
    items: list[tuple[str, ob.ObjectInfo | None]] = [
        (str(p), None) for p in (expand_inputs(local_patterns) if local_patterns else [])]
    if remote_patterns:
        c = client or ob.client(objectstore)
        objects = {info.url: info for pattern in remote_patterns for info in _expand_objects(c, pattern)}
        items += [(url, objects[url]) for url in sorted(objects)]
    if role != "pool" or (since is None and dates is None):
        return items
    dates = list(dates) if dates is not None else None
    keep = set(date_filter([path for path, _ in items], since, dates))
    if not keep:
        wanted = " and ".join(x for x in (f"since {since}" if since else "",
                                           f"in {sorted(d.isoformat() for d in dates)}" if dates else "") if x)
        raise InputError(f"inputs {patterns!r}: none of {len(items)} file(s) lies under a date=YYYY-MM-DD/ "
                         f"partition {wanted}")
    return [item for item in items if item[0] in keep]


def resolve_files(patterns: list[str], objectstore: ObjectStoreSettings | None = None, *, role: str = "pool",
                  since: date | None = None, dates: Iterable[date] | None = None,
                  client: ob.ObjectStoreClient | None = None) -> tuple[FileFingerprint, ...]:
    """Fingerprints of every input the patterns name: SHA-256 for local files, size + ETag for objects."""
    listed = _listed(patterns, objectstore, role, since, dates, client)
    local = fingerprint_files([p for p, info in listed if info is None])
    return tuple(local) + tuple(object_fingerprint(info) for _, info in listed if info is not None)


# --------------------------------------------------------------------------- reading bytes


def _zstd_chunks(fh) -> Iterator[bytes]:
    """Decompressed chunks of a (multi-frame) zstd stream; a truncated last frame is an error."""
    dctx = zstandard.ZstdDecompressor()
    obj, in_frame = dctx.decompressobj(), False
    while data := fh.read(_CHUNK):
        while data:
            out = obj.decompress(data)
            in_frame = True
            if out:
                yield out
            if obj.eof:  # frame finished: the rest of the input starts the next frame
                data, obj, in_frame = obj.unused_data, dctx.decompressobj(), False
            else:
                data = b""
    if in_frame and not obj.eof:
        raise EOFError("zstd stream ends in the middle of a frame (truncated file)")


Opener = Callable[[], BinaryIO]  # opens an input's raw (compressed) bytes; used as a context manager


def _byte_chunks(opener: Opener, compression: str | None) -> Iterator[bytes]:
    """Decompressed content of an input, streamed in chunks of about 1 MiB."""
    with opener() as raw:
        if compression == "gzip":
            with gzip.GzipFile(fileobj=raw, mode="rb") as fh:
                while chunk := fh.read(_CHUNK):
                    yield chunk
        elif compression == "zstd":
            yield from _zstd_chunks(raw)
        else:
            while chunk := raw.read(_CHUNK):
                yield chunk


class _HashingReader:
    """Reads through to an object stream, hashing every byte, so its SHA-256 costs no second read.

    It does not own the stream: leaving a `with` block on it closes nothing.
    """

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        """Read what a reader left (a .txt cut at max_doc_chars) so the hash covers the whole object."""
        while self.read(_CHUNK):
            pass

    def __enter__(self) -> "_HashingReader":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@contextmanager
def _container_errors(path: str | Path):
    """Turn a file that cannot be opened or decompressed into an InputError naming it."""
    try:
        yield
    except (ObjectStoreError, ObjectStoreIOError):
        raise  # already names the object and what to check; transient ones stay retryable
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise InputError(f"input {str(path)!r} cannot be read: {reason}") from None


def _lines(chunks: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its newline) over a stream of byte chunks."""
    line_no, pending = 0, []
    for chunk in chunks:
        parts = chunk.split(b"\n")
        if len(parts) == 1:
            pending.append(chunk)
            continue
        if pending:
            pending.append(parts[0])
            parts[0] = b"".join(pending)
        last = parts.pop()  # the unfinished line (b"" when the chunk ends with a newline)
        pending = [last] if last else []
        for part in parts:
            line_no += 1
            yield line_no, part
    if pending:
        yield line_no + 1, b"".join(pending)


# --------------------------------------------------------------------------- records


def doc_id(text: str) -> str:
    """Same value as quadflow.text.content_hash, about twice as fast.

    str.split() with no argument splits on exactly the characters that re's `\\s` matches
    (and strip() removes), so joining its parts equals `\\s+` -> " " plus strip.
    """
    norm = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=8).hexdigest()


def _as_id(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return _to_json(value)


def _excerpt(raw: bytes | str | dict) -> str:
    if isinstance(raw, bytes):
        return raw[: 4 * _EXCERPT_CHARS].decode("utf-8", errors="replace")[:_EXCERPT_CHARS]
    if isinstance(raw, dict):
        raw = _to_json(raw)
    return raw[:_EXCERPT_CHARS].encode("utf-8", errors="replace").decode("utf-8")


def nested_deeper_than(obj: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether arrays/objects nest more than `limit` levels deep in `obj` (walked without recursion)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _has_lone_surrogate(obj: Any) -> bool:
    try:
        _to_json(obj).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@dataclass(frozen=True)
class Batch:
    """One step of a file: parsed documents (DOC_SCHEMA), quarantined records (BAD_SCHEMA), records read."""

    good: pl.DataFrame
    bad: pl.DataFrame
    records: int


class _Collector:
    """Validates records of one file and accumulates them into column lists until flushed."""

    def __init__(self, role: str, file: str, text_field: str, id_field: str | None, max_doc_chars: int):
        self.role, self.file, self.source = role, file, file.replace(os.sep, "/").rsplit("/", 1)[-1]
        self.text_field, self.id_field, self.max_doc_chars = text_field, id_field, max_doc_chars
        self._reset()

    def _reset(self) -> None:
        self.texts, self.source_ids, self.sources, self.lines = [], [], [], []
        self.fields, self.n_chars, self.doc_ids = [], [], []
        self.bad_rows: list[tuple[int, str, str, str]] = []
        self.records = 0

    @property
    def pending(self) -> int:
        return len(self.texts) + len(self.bad_rows)

    def bad(self, line: int, reason: str, detail: str, raw: bytes | str | dict) -> None:
        self.bad_rows.append((line, reason, detail, _excerpt(raw)))

    def add(self, line: int, obj: dict, raw: bytes | dict, maybe_surrogate: bool, maybe_deep: bool = False) -> None:
        """Validate one parsed object; keep it as a document or quarantine it with a reason."""
        if maybe_deep and nested_deeper_than(obj):
            return self.bad(line, "too_deep", f"arrays/objects nest more than {MAX_DEPTH} levels deep", raw)
        tf = self.text_field
        text = obj.get(tf, _MISSING)
        if text is _MISSING or text is None:
            return self.bad(line, "missing_text", f"field {tf!r} is {'absent' if text is _MISSING else 'null'}", raw)
        if isinstance(text, (bytes, bytearray)):  # Parquet binary columns
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                return self.bad(line, "undecodable", f"field {tf!r}: invalid UTF-8 at byte {e.start}", raw)
        if not isinstance(text, str):
            return self.bad(line, "wrong_type", f"field {tf!r} is {type(text).__name__}, not a string", raw)
        if not text or text.isspace():
            return self.bad(line, "empty_text", f"field {tf!r} is {'empty' if not text else 'whitespace only'}", raw)
        n = len(text)
        if n > self.max_doc_chars:
            return self.bad(line, "oversize", f"text has {n:,} chars > max_doc_chars {self.max_doc_chars:,}", raw)
        if maybe_surrogate and _has_lone_surrogate(obj):
            return self.bad(line, "undecodable", "record holds a lone UTF-16 surrogate escape (not valid Unicode)", raw)
        rest = {k: v for k, v in obj.items() if k != tf}
        src = rest.get("source")
        self.texts.append(text)
        self.doc_ids.append(doc_id(text))
        self.n_chars.append(n)
        self.lines.append(line)
        self.source_ids.append(_as_id(rest.get(self.id_field)) if self.id_field else None)
        self.sources.append(src if isinstance(src, str) else self.source)
        self.fields.append(_to_json(rest) if rest else None)

    def flush(self) -> Batch:
        n = len(self.texts)
        good = pl.DataFrame(
            {
                "role": [self.role] * n, "text": self.texts, "source_id": self.source_ids, "source": self.sources,
                "file": [self.file] * n, "line": self.lines, "fields": self.fields, "n_chars": self.n_chars,
                "n_tokens": [0] * n, "doc_id": self.doc_ids,
            },
            schema=DOC_SCHEMA,
        ).with_columns(count_tokens_expr("text").alias("n_tokens"))
        rows = self.bad_rows
        bad = pl.DataFrame(
            {
                "role": [self.role] * len(rows), "file": [self.file] * len(rows), "line": [r[0] for r in rows],
                "reason": [r[1] for r in rows], "detail": [r[2] for r in rows], "excerpt": [r[3] for r in rows],
            },
            schema=BAD_SCHEMA,
        )
        batch = Batch(good=good, bad=bad, records=self.records)
        self._reset()
        return batch


def _read_jsonl(opener: Opener, compression: str | None, col: _Collector, batch_rows: int) -> Iterator[Batch]:
    with _container_errors(col.file):
        for line_no, raw in _lines(_byte_chunks(opener, compression)):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw or raw.isspace():  # blank lines separate nothing and hold no record
                continue
            col.records += 1
            try:
                s = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                col.bad(line_no, "undecodable", f"invalid UTF-8 at byte {e.start}", raw)
            else:
                try:
                    obj = json.loads(s)
                except (ValueError, RecursionError) as e:
                    col.bad(line_no, "malformed_json", str(e) or type(e).__name__, raw)
                else:
                    if type(obj) is dict:
                        # a record can only nest deeper than MAX_DEPTH with more brackets than that
                        col.add(line_no, obj, raw, b"\\ud" in raw or b"\\uD" in raw,
                                raw.count(b"[") + raw.count(b"{") > MAX_DEPTH)
                    else:
                        col.bad(line_no, "not_an_object", f"JSON value is a {type(obj).__name__}, not an object", raw)
            if col.pending >= batch_rows:
                yield col.flush()
    if col.records:
        yield col.flush()


def _read_txt(opener: Opener, compression: str | None, col: _Collector) -> Iterator[Batch]:
    """One document per file; reading stops once the text is known to be oversize."""
    limit = col.max_doc_chars
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts, n, offset, head = [], 0, 0, b""  # offset: bytes of the file decoded before this chunk
    with _container_errors(col.file):
        try:
            for chunk in _byte_chunks(opener, compression):
                if len(head) < 4 * _EXCERPT_CHARS:
                    head += chunk[: 4 * _EXCERPT_CHARS]
                buffered = len(decoder.getstate()[0])
                piece = decoder.decode(chunk)
                offset += len(chunk)
                parts.append(piece)
                n += len(piece)
                if n > limit:
                    break
            else:
                buffered = len(decoder.getstate()[0])
                parts.append(decoder.decode(b"", final=True))
        except UnicodeDecodeError as e:
            at = offset - buffered + e.start
            col.records = 1
            col.bad(1, "undecodable", f"invalid UTF-8 at byte {at}", head)
            yield col.flush()
            return
    text = "".join(parts).removeprefix("\ufeff")
    col.records = 1
    if len(text) > limit:
        col.bad(1, "oversize", f"text has more than max_doc_chars {limit:,} chars", head)
    else:
        col.add(1, {col.text_field: text}, head, False)
    yield col.flush()


def _read_parquet(path: Path, col: _Collector, batch_rows: int) -> Iterator[Batch]:
    """Parquet needs random access: `path` is a local file (objects are downloaded first)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = col.file
    with _container_errors(name):
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, ValueError) as e:
            raise InputError(f"input {name!r} is not a readable Parquet file: {e}") from None
        names = pf.schema_arrow.names
        if col.text_field not in names:
            raise InputError(
                f"input {name!r} has no text column {col.text_field!r} (columns: {', '.join(names)}); "
                f"set ingest.text_field"
            )
        row = 0
        try:
            for rb in pf.iter_batches(batch_size=batch_rows):
                for obj in _parquet_rows(rb):
                    row += 1
                    col.records += 1
                    if isinstance(obj, UnicodeDecodeError):
                        col.bad(row, "undecodable", f"a string column holds invalid UTF-8: {obj.reason}", b"")
                    else:
                        col.add(row, obj, obj, False)  # Arrow refuses Parquet schemas nested past 100 nodes
                yield col.flush()
        except pa.ArrowException as e:
            raise InputError(f"input {name!r} cannot be read as Parquet: {e}") from None


def _parquet_rows(rb) -> list[dict | UnicodeDecodeError]:
    """Rows of a record batch as dicts; a row with invalid UTF-8 comes back as its decode error."""
    try:
        return rb.to_pylist()
    except UnicodeDecodeError:
        out = []
        for i in range(rb.num_rows):
            try:
                out.append(rb.slice(i, 1).to_pylist()[0])
            except UnicodeDecodeError as e:
                out.append(e)
        return out


def read_file(
    path: str | Path,
    role: str,
    text_field: str = "text",
    id_field: str | None = "id",
    max_doc_chars: int = 1_000_000,
    batch_rows: int = 50_000,
    *,
    name: str | None = None,
    opener: Opener | None = None,
) -> Iterator[Batch]:
    """Stream one input file as batches of documents and quarantined records (never the whole file).

    `name` is what rows record as their file (default: the path) and decides the format;
    `opener` supplies the raw bytes of a JSONL/txt input from elsewhere (an object stream).
    """
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {ROLES}")
    name = str(Path(path)) if name is None else name
    kind, compression = file_format(name)
    col = _Collector(role, name, text_field, id_field, max_doc_chars)
    if kind == "parquet":
        if opener is not None:
            raise ValueError(f"{name!r}: Parquet needs random access; pass a local path, not an opener")
        return _read_parquet(Path(path), col, batch_rows)
    opener = opener or (lambda: open(path, "rb"))
    if kind == "jsonl":
        return _read_jsonl(opener, compression, col, batch_rows)
    return _read_txt(opener, compression, col)


@dataclass
class ObjectRead:
    """What reading one object found out: SHA-256 and size of its bytes, its version, the retries it took."""

    sha256: str = ""
    bytes: int = 0
    version_id: str | None = None
    retries: int = 0


def read_object(
    c: ob.ObjectStoreClient,
    fp: FileFingerprint,
    role: str,
    text_field: str = "text",
    id_field: str | None = "id",
    max_doc_chars: int = 1_000_000,
    batch_rows: int = 50_000,
    stats: ObjectRead | None = None,
) -> Iterator[Batch]:
    """Stream one s3:// object like read_file: pinned to its listed ETag, hashed on the way.

    JSONL and text stream (memory bounded by the read buffer); Parquet is first copied to a
    temporary file, since its reader needs random access. Rows name the object's URL.
    `stats` is filled in once the object has been read to the end.
    """
    kind, _ = file_format(fp.path)
    stats = stats if stats is not None else ObjectRead()
    before = c.counters.snapshot()["retries"]
    with ob.open_read(c, fp.path, etag=fp.etag, version_id=fp.version_id) as raw:
        hashed = _HashingReader(raw)
        if kind == "parquet":
            with tempfile.TemporaryDirectory(prefix="quadflow-ingest-") as tmp:
                local = Path(tmp) / "object.parquet"
                with open(local, "wb") as out:
                    while chunk := hashed.read(_CHUNK):
                        out.write(chunk)
                yield from read_file(local, role, text_field, id_field, max_doc_chars, batch_rows, name=fp.path)
        else:
            yield from read_file(fp.path, role, text_field, id_field, max_doc_chars, batch_rows, name=fp.path,
                                 opener=lambda: hashed)
        hashed.drain()
        stats.sha256, stats.bytes = hashed.sha256.hexdigest(), hashed.bytes
        stats.version_id = raw.raw.version_id
    stats.retries = c.counters.snapshot()["retries"] - before


class Deduplicator:
    """Exact dedup by doc_id within a role: the first copy in (file, line) order is kept."""

    def __init__(self) -> None:
        self.seen_: dict[str, tuple[str, int]] = {}  # doc_id -> (file, line) of the kept copy
        self.n_kept_ = 0

    def preload(self, kept: pl.DataFrame) -> "Deduplicator":
        """Documents already in the partition (doc_id, file, line; doc_idx 0..n-1): later copies are duplicates."""
        self.seen_.update(zip(kept["doc_id"].to_list(), zip(kept["file"].to_list(), kept["line"].to_list())))
        self.n_kept_ += kept.height
        return self

    def update(self, good: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Kept documents with a dense doc_idx continuing from the last batch, and the dropped copies."""
        seen = self.seen_
        keep, kept_at = [], []
        for did, file, line in zip(good["doc_id"].to_list(), good["file"].to_list(), good["line"].to_list()):
            first = seen.get(did)
            if first is None:
                seen[did] = (file, line)
                keep.append(True)
            else:
                keep.append(False)
                kept_at.append(first)
        mask = pl.Series(keep, dtype=pl.Boolean)
        kept = good.filter(mask)
        kept = kept.with_columns(
            pl.int_range(self.n_kept_, self.n_kept_ + kept.height, dtype=pl.Int64).alias("doc_idx")
        )
        self.n_kept_ += kept.height
        dups = good.filter(~mask).select("role", "doc_id", "file", "line").with_columns(
            pl.Series("kept_file", [f for f, _ in kept_at], dtype=pl.String),
            pl.Series("kept_line", [ln for _, ln in kept_at], dtype=pl.Int64),
        )
        return kept, dups


# --------------------------------------------------------------------------- exact dedup by hash range

# Exact dedup is range-partitioned on a doc_id's leading 32 bits (doc_id is a hex content hash, so they are
# uniform): each input's parse task writes its ids sorted by that value (an "ids" part), and each dedup task
# reads one range of it from every input, so no process holds or scans every id of the pool.
HASH_SPACE = 1 << 32
IDS_ROW_GROUP = 8192  # rows per row group of an ids part: at most this many rows are read beyond a range
# The flow's process reads every range's dropped copies at once: one open part (of at most MAX_HASH_RANGES)
# and this many rows each.
DROPS_BATCH = 2048
IDS_SCHEMA = {"h": pl.Int64, "doc_id": pl.String, "file": pl.String, "line": pl.Int64}
DUPS_SCHEMA = {"pos": pl.Int64, "file": pl.String, "line": pl.Int64, "doc_id": pl.String, "kept_file": pl.String,
               "kept_line": pl.Int64}


def sorted_ids(docs: pl.DataFrame) -> pl.DataFrame:
    """IDS_SCHEMA rows of documents (doc_id, file, line), sorted by h (stably: copies stay in file order)."""
    return (docs.select(pl.col("doc_id").str.slice(0, 8).str.to_integer(base=16).alias("h"), "doc_id", "file", "line")
            .cast(IDS_SCHEMA).sort("h", maintain_order=True))


def first_copies(ids: pl.DataFrame) -> pl.DataFrame:
    """The dropped copies among one role's rows (pos, doc_id, file, line): every row but the first of its
    doc_id in load order, with the kept copy's file and line; DUPS_SCHEMA, sorted by (pos, line).

    `pos` is the input's place in the load order, -1 for documents the partition already holds (all kept);
    within an input, lines are in file order. The same as Deduplicator over the inputs in that order.
    """
    ids = ids.sort("pos", "line", maintain_order=True)
    first = ids["doc_id"].is_first_distinct()
    kept = ids.filter(first).select("doc_id", pl.col("file").alias("kept_file"), pl.col("line").alias("kept_line"))
    return ids.filter(~first).join(kept, on="doc_id", how="left", maintain_order="left").select(
        list(DUPS_SCHEMA)).cast(DUPS_SCHEMA)


class _Drops:
    """One role's dropped copies as the dedup tasks wrote them (each part sorted by (pos, line)), handed out
    input by input in load order, and the doc_idx the next kept document gets. Memory: DROPS_BATCH rows per
    part, whatever the pool."""

    def __init__(self, parts: Parts, urls: list[str], next_idx: int) -> None:
        self._streams = [parts.iter_batches(url, DROPS_BATCH) for url in urls]
        self._heads: list[pl.DataFrame | None] = [None] * len(urls)
        self.next_idx = next_idx

    def take(self, pos: int) -> pl.DataFrame:
        """The dropped copies in input `pos`, by line; inputs must be taken in increasing `pos`."""
        out = [pl.DataFrame(schema=DUPS_SCHEMA)]
        for j, stream in enumerate(self._streams):
            head = self._heads[j]
            while True:
                if head is None or head.height == 0:
                    batch = next(stream, None)
                    if batch is None:
                        head = None
                        break
                    head = pl.from_arrow(batch).cast(DUPS_SCHEMA)
                    continue
                n = head["pos"].search_sorted(pos, side="right")
                out.append(head.slice(0, n))
                head = head.slice(n)
                if head.height:
                    break
            self._heads[j] = head
        return pl.concat(out).sort("line")

    def close(self) -> None:
        for stream in self._streams:
            stream.close()


# --------------------------------------------------------------------------- incremental plan


@dataclass(frozen=True)
class IngestPlan:
    """How a partition is built from a base partition: whose rows are copied, what is read."""

    base_key: str | None  # partition whose rows are reused; None: every input is read
    kept: tuple[tuple[str, str], ...]  # (role, file): rows copied from the base, in its order
    read: tuple[tuple[str, FileFingerprint], ...]  # (role, input): read and appended, in this order
    added: int = 0  # inputs the base does not have
    changed: int = 0  # inputs the base has with another identity
    removed: int = 0  # base inputs no longer among the inputs (their rows are dropped)
    reread: int = 0  # unchanged inputs read again: one of their duplicates was kept in a dropped input


def _wanted_rows(wanted: dict[str, tuple[FileFingerprint, ...]]) -> dict[tuple[str, str], tuple[str, int]]:
    return {(role, fp.path): (fp.identity, fp.size) for role, fps in wanted.items() for fp in fps}


def choose_base(wanted: dict[str, tuple[FileFingerprint, ...]], history: pl.DataFrame) -> tuple[str | None, bool]:
    """The partition to build on: (key, exact) where exact means it holds exactly these inputs.

    `history` (key, created_at, role, file, identity): one row per input of every earlier
    partition with the same ingest settings. An exact match wins (the newest, if several); else
    the partition sharing the most bytes of unchanged inputs (the newest on ties); (None, False)
    when none shares any.
    """
    want = _wanted_rows(wanted)
    identities = {k: v[0] for k, v in want.items()}
    exact: tuple[datetime, str] | None = None
    partial: tuple[int, datetime, str] | None = None
    for (key, created), rows in history.group_by(["key", "created_at"]):
        have = dict(zip(zip(rows["role"], rows["file"]), rows["identity"]))
        if have == identities:
            exact = max(exact, (created, key)) if exact else (created, key)
            continue
        shared = sum(want[k][1] for k, i in have.items() if identities.get(k) == i)
        if shared > 0:
            partial = max(partial, (shared, created, key)) if partial else (shared, created, key)
    if exact is not None:
        return exact[1], True
    return (partial[2], False) if partial is not None else (None, False)


def plan_increment(wanted: dict[str, tuple[FileFingerprint, ...]], base_key: str | None,
                   base_inputs: pl.DataFrame, duplicate_links: pl.DataFrame) -> IngestPlan:
    """Which base inputs keep their rows and which inputs are read, from the base's inputs and links.

    `base_inputs`: (role, file, identity) of the base; `duplicate_links`: distinct (role, file,
    kept_file) of the base's duplicates across inputs. An unchanged input stays only while every
    duplicate in it points at an input that stays (a fixpoint: dropping one may drop others).
    """
    order = [(role, fp) for role in ROLES for fp in wanted.get(role, ())]
    if base_key is None:
        return IngestPlan(None, (), tuple(order), added=len(order))
    want = _wanted_rows(wanted)
    base = {(r, f): i for r, f, i in zip(base_inputs["role"], base_inputs["file"], base_inputs["identity"])}
    unchanged = {k for k, i in base.items() if k in want and want[k][0] == i}
    stays = set(unchanged)
    links = list(zip(duplicate_links["role"], duplicate_links["file"], duplicate_links["kept_file"]))
    moved = True
    while moved:
        moved = False
        for role, f, kept_f in links:
            if (role, f) in stays and (role, kept_f) not in stays:
                stays.discard((role, f))
                moved = True
    if not stays:
        return IngestPlan(None, (), tuple(order), added=sum(k not in base for k in want),
                          changed=sum(k in base and k not in unchanged for k in want),
                          removed=sum(k not in want for k in base), reread=len(unchanged))
    kept = tuple(k for k in base if k in stays)  # base order is restored by the copy (doc_idx)
    read = tuple((role, fp) for role, fp in order if (role, fp.path) not in stays)
    return IngestPlan(
        base_key, kept, read,
        added=sum(k not in base for k in want), changed=sum(k in base and k not in unchanged for k in want),
        removed=sum(k not in want for k in base), reread=len(unchanged) - len(stays),
    )


# --------------------------------------------------------------------------- task


def _key_file(fp: FileFingerprint) -> dict[str, Any]:
    """What of an input the output depends on: path, size and content identity (not mtime or version)."""
    d = asdict(fp)
    for name in ("mtime_ns", "version_id"):
        d.pop(name)
    return {k: v for k, v in d.items() if v not in (None, "")}


def _check_unchanged(fp: FileFingerprint) -> None:
    try:
        st = os.stat(fp.path)
    except OSError as e:
        raise InputError(f"input {fp.path!r} cannot be read: {e.strerror or e}") from None
    if (st.st_size, st.st_mtime_ns) != (fp.size, fp.mtime_ns):
        raise InputError(f"input {fp.path!r} changed after it was fingerprinted; rerun to pick up the new content")


def _insert(con, name: str, frame: pl.DataFrame, key: str, **params: Any) -> None:
    if frame.height:
        insert_frame(con, name, frame, {"key": key, **params})


def _section(settings: IngestSettings) -> dict[str, Any]:
    # inputs/targets/since/partitions act through the resolved inputs; batch_rows and incremental
    # do not change what a partition holds (an incremental partition's key names its base)
    return settings.model_dump(
        mode="json", exclude={"inputs", "targets", "batch_rows", "since", "partitions", "incremental"})


DOC_REF_COLUMNS = ["role", "doc_idx", "doc_id", "n_tokens"]


@dataclass
class _Totals:
    reasons: Counter = field(default_factory=Counter)
    objects_read: int = 0
    bytes_read: int = 0
    retries: int = 0
    docs: int = 0  # documents kept

    def add(self, other: "_Totals") -> None:
        self.reasons.update(other.reasons)
        self.objects_read += other.objects_read
        self.bytes_read += other.bytes_read
        self.retries += other.retries
        self.docs += other.docs

    def to_json(self) -> str:
        """What the shard ledger keeps per input, so a resumed run's ingest_runs row counts it."""
        return json.dumps({"reasons": dict(self.reasons), "objects_read": self.objects_read,
                           "bytes_read": self.bytes_read, "retries": self.retries, "docs": self.docs})

    @classmethod
    def from_json(cls, text: str) -> "_Totals":
        d = json.loads(text)
        return cls(Counter(d["reasons"]), d["objects_read"], d["bytes_read"], d["retries"], d["docs"])


def _done_inputs(con, key: str) -> list[tuple[str, int, str]]:
    """(role, input position, counts JSON) of the inputs an earlier attempt at partition `key` committed."""
    run_sql(con, "shards_create")
    return [(r, int(lo), info) for r, lo, info in query_sql(con, "ingest_done_inputs", {"key": key}).fetchall()]


@task(name="ingest-read", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient_failure)
def ingest_read(shard: Shard, input_path: str, output_path: str, reads: tuple[tuple[str, FileFingerprint], ...],
                settings: IngestSettings, objectstore: ObjectStoreSettings | None, parts: Parts) -> ShardResult:
    """Parse one input (`reads[shard.lo]`) into two parts: its documents (DOC_SCHEMA, in file order) at
    `output_path` and its quarantined records (BAD_SCHEMA) beside it; what was read goes in `info`."""
    start = time.perf_counter()
    role, fp = reads[shard.lo]
    stats, bad, records = ObjectRead(), [], 0
    args = (role, settings.text_field, settings.id_field, settings.max_doc_chars, settings.batch_rows)
    if fp.is_object:
        batches = read_object(ob.client(objectstore), fp, *args, stats=stats)
    else:
        _check_unchanged(fp)
        batches = read_file(fp.path, *args)

    def documents() -> Iterator[Any]:
        nonlocal records
        for batch in batches:
            records += batch.records
            if batch.bad.height:
                bad.append(batch.bad)  # excerpts are capped, so this stays small next to the documents
            ids.append(batch.good.select("doc_id", "file", "line"))
            yield batch.good.to_arrow()

    ids: list[pl.DataFrame] = []
    rows = parts.write_parquet(output_path, documents(), schema=_DOC_ARROW)
    parts.write_parquet(_bad_path(output_path), [pl.concat(bad).to_arrow() if bad else _EMPTY_BAD.to_arrow()])
    by_hash = sorted_ids(pl.concat(ids) if ids else pl.DataFrame(schema=IDS_SCHEMA))
    parts.write_parquet(_ids_path(output_path), (by_hash.slice(i, IDS_ROW_GROUP).to_arrow()
                                                 for i in range(0, by_hash.height, IDS_ROW_GROUP)), schema=_IDS_ARROW)
    info = {"records": records, "sha256": stats.sha256 if fp.is_object else fp.sha256, "bytes": stats.bytes,
            "version_id": stats.version_id, "retries": stats.retries}
    return ShardResult(shard, output_path, rows, time.perf_counter() - start, worker_name(), info)


@task(name="ingest-dedup", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient_failure)
def ingest_dedup(shard: Shard, input_path: str, output_path: str, ids: dict[str, tuple[tuple[int, str], ...]],
                 ranges: dict[str, int], parts: Parts) -> ShardResult:
    """Find the exact duplicates in one hash range (`shard.lo` of `ranges[role]`) of one role's ids parts
    (`ids[role]`: (load position, url), position -1 for the partition's documents so far): their
    first_copies, written to `output_path` (DUPS_SCHEMA, sorted by input and line). `input_path` is unused."""
    start = time.perf_counter()
    role = shard.role.removeprefix("dedup-")
    lo, hi = hash_range(shard.lo, ranges[role], HASH_SPACE)
    frames = [pl.DataFrame(schema=IDS_SCHEMA).with_columns(pos=pl.lit(0, pl.Int64))]
    for pos, url in ids[role]:
        rows = pl.from_arrow(parts.read_range(url, "h", lo, hi, list(IDS_SCHEMA)))
        frames.append(rows.cast(IDS_SCHEMA).with_columns(pos=pl.lit(pos, pl.Int64)))
    dups = first_copies(pl.concat(frames))
    written = parts.write_parquet(output_path, [dups.to_arrow()])
    return ShardResult(shard, output_path, written, time.perf_counter() - start, worker_name())


_EMPTY_BAD = pl.DataFrame(schema=BAD_SCHEMA)
_DOC_ARROW = pl.DataFrame(schema=DOC_SCHEMA).to_arrow().schema
_IDS_ARROW = pl.DataFrame(schema=IDS_SCHEMA).to_arrow().schema


def _bad_path(output_path: str) -> str:
    return Parts.beside(output_path, "bad")


def _ids_path(output_path: str) -> str:
    return Parts.beside(output_path, "ids")


def _find_duplicates(con, key: str, todo: list[Shard], parsed: dict[tuple[str, int], ShardResult], parts: Parts,
                     run: RunSettings) -> dict[str, _Drops]:
    """Run the dedup tasks over the parsed inputs' ids and the documents partition `key` already holds, one
    task per hash range; returns each role's dropped copies, to be taken input by input in load order."""
    ids: dict[str, list[tuple[int, str]]] = {}
    ranges: dict[str, int] = {}
    held: dict[str, int] = {}
    for role in ROLES:
        mine = [s.lo for s in todo if s.role == role]
        if not mine:
            continue
        held[role] = int(query_sql(con, "ingest_count_kept", {"key": key, "role": role}).fetchone()[0])
        ids[role] = [(pos, _ids_path(parsed[(role, pos)].path)) for pos in mine]
        if held[role]:
            url = parts.url(f"ids-held-{role}.parquet")
            parts.write_parquet(url, query_sql(con, "ingest_held_ids", {"key": key, "role": role})
                                .fetch_record_batch(IDS_ROW_GROUP))
            ids[role].insert(0, (-1, url))
        n = held[role] + sum(parsed[(role, pos)].rows for pos in mine)
        ranges[role] = hash_ranges(n, run.shard_docs)
        get_logger().info(f"ingest: exact dedup of {n:,} {role} ids in {ranges[role]} hash ranges")
    shards = [Shard(f"dedup-{role}", i, i + 1) for role in ids for i in range(ranges[role])]
    found = {r.shard: r.path for r in execute_shards(ingest_dedup, shards, parts, {
        "ids": {role: tuple(v) for role, v in ids.items()}, "ranges": ranges})}
    return {role: _Drops(parts, [found[s] for s in shards if s.role == f"dedup-{role}"], held[role])
            for role in ids}


def _load_input(con, key: str, fp: FileFingerprint, result: ShardResult, parts: Parts, settings: IngestSettings,
                drops: _Drops, totals: _Totals) -> None:
    """Load one parsed input into partition `key`: its documents but the dropped copies (doc_idx continuing
    from `drops.next_idx`), the dropped copies, its quarantined records and its file rows."""
    role, info = result.shard.role, result.info
    counts: Counter[str] = Counter(records=info["records"])
    dropped = drops.take(result.shard.lo)
    for rb in parts.iter_batches(result.path, settings.batch_rows):
        kept = pl.from_arrow(rb).cast(DOC_SCHEMA).filter(~pl.col("line").is_in(dropped["line"].implode()))
        kept = kept.with_columns(
            pl.int_range(drops.next_idx, drops.next_idx + kept.height, dtype=pl.Int64).alias("doc_idx"))
        drops.next_idx += kept.height
        _insert(con, "ingest_insert_docs", kept, key)
        counts.update(ingested=kept.height)
        totals.docs += kept.height
    _insert(con, "ingest_insert_duplicates", dropped.with_columns(role=pl.lit(role)), key)
    counts.update(duplicates=dropped.height)
    bad = pl.from_arrow(parts.read_table(_bad_path(result.path))).cast(BAD_SCHEMA)
    _insert(con, "ingest_insert_quarantine", bad, key)
    counts.update(quarantined=bad.height)
    totals.reasons.update(bad["reason"].to_list())
    file_row = pl.DataFrame([{
        "role": role, "file": fp.path, "size_bytes": fp.size, "sha256": info["sha256"], "records": counts["records"],
        "ingested": counts["ingested"], "quarantined": counts["quarantined"], "duplicates": counts["duplicates"],
    }])
    _insert(con, "ingest_insert_files", file_row, key)
    object_row = pl.DataFrame([{
        "role": role, "file": fp.path, "size_bytes": fp.size, "identity": fp.identity, "etag": fp.etag,
        "version_id": info["version_id"] or fp.version_id, "retries": info["retries"],
    }], schema={"role": pl.String, "file": pl.String, "size_bytes": pl.Int64, "identity": pl.String,
                "etag": pl.String, "version_id": pl.String, "retries": pl.Int64})
    _insert(con, "ingest_insert_objects", object_row, key)
    if fp.is_object:
        totals.objects_read += 1
        totals.bytes_read += info["bytes"]
        totals.retries += info["retries"]


def require_documents(counts: list[tuple[str, str | None, int]], settings: IngestSettings,
                      files: tuple[FileFingerprint, ...], targets: tuple[FileFingerprint, ...], store: str) -> None:
    """InputError when the pool, or a target set that was given, has no document left to curate.

    `counts`: (role, reason, n) rows of sql/ingest_role_counts.sql, reason None on a role's document count.
    Without this an empty or fully quarantined pool failed later with a traceback from k-means, and a target
    set whose every record was bad silently turned the target scorers off.
    """
    docs = {role: n for role, reason, n in counts if reason is None}
    for role, inputs in (("pool", files), ("target", targets)):
        if not inputs or docs.get(role, 0) > 0:
            continue
        reasons = {reason: n for r, reason, n in counts if r == role and reason is not None}
        names = ", ".join(repr(f.path) for f in inputs[:3]) + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")
        what = "the pool" if role == "pool" else "the target set"
        if not reasons:
            raise InputError(f"{what} holds no document: its {len(inputs)} input(s) ({names}) hold no record")
        total = sum(reasons.values())
        summary = ", ".join(f"{r}={n:,}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        msg = f"{what} holds no usable document: all {total:,} records of {names} were quarantined ({summary})"
        if reasons.get("missing_text", 0) * 2 > total:
            msg += (f"; most records have no text field {settings.text_field!r}: set --text-field "
                    f"(ingest.text_field) to the field that holds the text")
        else:
            msg += f"; see `select reason, detail, excerpt from ingest_quarantine` in {store}"
        if role == "target":
            msg += "; without target documents the target scorers have nothing to compare with"
        raise InputError(msg)


def _role_counts(con, key: str) -> list[tuple[str, str | None, int]]:
    return [(r, reason, int(n)) for r, reason, n in query_sql(con, "ingest_role_counts", {"key": key}).fetchall()]


def _run_row(plan: IngestPlan, section_json: str, reused_docs: int, totals: _Totals) -> pl.DataFrame:
    """The ingest_runs row of a partition: its base and what was reused and read."""
    counts = {
        "inputs": len(plan.kept) + len(plan.read), "reused": len(plan.kept), "read": len(plan.read),
        "added": plan.added, "changed": plan.changed, "removed": plan.removed, "reread": plan.reread,
        "docs_reused": reused_docs, "objects_read": totals.objects_read, "bytes_read": totals.bytes_read,
        "retries": totals.retries,
    }
    row = {"base_key": plan.base_key, "section": section_json,
           "created_at": datetime.now(timezone.utc).replace(tzinfo=None), **counts}
    schema = {"base_key": pl.String, "section": pl.String, "created_at": pl.Datetime("us"),
              **{c: pl.Int64 for c in counts}}
    return pl.DataFrame([row], schema=schema)


@stage_task("ingest", cache_policy=(INPUTS - "run") + TASK_SOURCE, **IO_RETRIES)
def ingest(
    settings: IngestSettings,
    files: tuple[FileFingerprint, ...],
    targets: tuple[FileFingerprint, ...],
    store: StoreRef,
    objectstore: ObjectStoreSettings | None = None,
    run: RunSettings = RunSettings(),
) -> StageRef:
    """Load pool and target inputs into one ingest partition; bad records are quarantined, not dropped.

    Inputs already ingested unchanged into this store are copied, not read (see the module doc);
    the others are parsed by shard tasks on the flow's task runner and loaded here in input order.
    `run` (runner, parts) says how, never what: it is not in the cache key.
    """
    if not files:
        raise InputError("no pool input files: give at least one input")
    section = _section(settings)
    section_json = json.dumps(section, sort_keys=True)
    wanted = {"pool": tuple(files), "target": tuple(targets)}
    full_key = stage_key("ingest", VERSION, section, [_key_file(f) for f in files], [_key_file(f) for f in targets])
    log = get_logger()
    with connect(store) as con:
        run_sql(con, "ingest_schema")
        history = query_sql(con, "ingest_history", {"section": section_json}).pl()
        if not settings.incremental:
            history = history.filter(pl.col("key") == full_key)
        base_key, exact = choose_base(wanted, history)
        if exact:
            log.info(f"ingest: the {sum(map(len, wanted.values()))} inputs are unchanged since partition {base_key}; "
                     f"nothing read")
            require_documents(_role_counts(con, base_key), settings, files, targets, store.path)
            return make_ref(con, "ingest", base_key, store, "ingest_docs", DOC_REF_COLUMNS)
        params = {"base": base_key}
        plan = plan_increment(
            wanted, base_key,
            query_sql(con, "ingest_base_inputs", params).pl() if base_key else pl.DataFrame(),
            query_sql(con, "ingest_base_links", params).pl() if base_key else pl.DataFrame(),
        )
        key = full_key if plan.base_key is None else stage_key(
            "ingest", VERSION, section, [_key_file(f) for f in files], [_key_file(f) for f in targets],
            {"base": plan.base_key})
        if plan.base_key is not None:
            log.info(f"ingest: building on partition {plan.base_key}: {len(plan.kept)} inputs reused, "
                     f"{plan.added} added, {plan.changed} changed, {plan.removed} removed, {plan.reread} re-read")
        progress = Progress("ingest", total=None, unit="docs")
        totals = _Totals()
        done = {(role, lo): info for role, lo, info in _done_inputs(con, key)}
        if ("base", 0) not in done:  # a fresh partition (not one a killed run left half done)
            with transaction(con):
                run_sql(con, "ingest_delete", {"key": key})
                run_sql(con, "shards_delete_stage", {"stage": "ingest", "key": key})
                if plan.base_key is not None:
                    kept = pl.DataFrame(list(plan.kept), schema={"role": pl.String, "file": pl.String}, orient="row")
                    _insert(con, "ingest_copy", kept, key, base=plan.base_key)
                reused = sum(int(query_sql(con, "ingest_count_kept", {"key": key, "role": r}).fetchone()[0])
                             for r in ROLES)
                record_shard(con, "ingest", key, ShardResult(Shard("base", 0, 1), plan.base_key or "", reused, 0.0,
                                                             worker_name()), "computed", json.dumps({"docs": reused}))
            done[("base", 0)] = json.dumps({"docs": reused})
        else:
            log.info(f"ingest: resuming partition {key}: {len(done) - 1} of {len(plan.read)} inputs already in the store")
        reused_docs = int(json.loads(done[("base", 0)])["docs"])
        # load order: pool inputs, then target inputs, each in plan order (it decides which copy is kept)
        order = [(role, i) for role in ROLES for i, (r, _) in enumerate(plan.read) if r == role]
        for role, i in order:
            if (role, i) in done:  # committed by an earlier, killed attempt: its counts come from the ledger
                totals.add(_Totals.from_json(done[(role, i)]))
        todo = [Shard(role, i, i + 1) for role, i in order if (role, i) not in done]
        parts = stage_parts(run, store.path, "ingest", key, objectstore)
        parts.check()
        reads = tuple(plan.read)
        parsed: dict[tuple[str, int], ShardResult] = {}
        for result in execute_shards(ingest_read, todo, parts, {"reads": reads, "settings": settings,
                                                                 "objectstore": objectstore}):
            parsed[(result.shard.role, result.shard.lo)] = result
            progress.update(result.info["records"])
        # every input is parsed: which copy of a document is kept depends on all those before it
        drops = _find_duplicates(con, key, todo, parsed, parts, run) if todo else {}
        try:
            for shard in todo:  # in load order
                result, fp = parsed[(shard.role, shard.lo)], reads[shard.lo][1]
                part = _Totals()
                with transaction(con):
                    _load_input(con, key, fp, result, parts, settings, drops[shard.role], part)
                    record_shard(con, "ingest", key, ShardResult(shard, fp.path, part.docs, result.seconds,
                                                                 result.worker), "computed", part.to_json())
                totals.add(part)
                for path in (result.path, _bad_path(result.path), _ids_path(result.path)):
                    parts.delete(path)
        finally:
            for d in drops.values():
                d.close()
        parts.clean()
        with transaction(con):
            _insert(con, "ingest_insert_run", _run_row(plan, section_json, reused_docs, totals), key)
        progress.close()
        if totals.objects_read:
            log.info(f"ingest: read {totals.objects_read} objects ({totals.bytes_read:,} bytes) with "
                     f"{totals.retries} retries")
        if totals.reasons:
            summary = ", ".join(f"{r}={n:,}" for r, n in sorted(totals.reasons.items()))
            log.warning(f"ingest: quarantined {sum(totals.reasons.values()):,} records ({summary}); "
                        f"see ingest_quarantine")
        require_documents(_role_counts(con, key), settings, files, targets, store.path)
        return make_ref(con, "ingest", key, store, "ingest_docs", DOC_REF_COLUMNS)
