"""Ingest: read raw files into the store with stable ids and token counts, exact-dedup them,
and quarantine every record that cannot be a document, with its location and a reason.

Core (no Prefect, no DuckDB): `expand_inputs`, `fingerprint_files`, `read_file`, `doc_id`,
`Deduplicator`. Task: `ingest`, which writes ingest_docs, ingest_quarantine,
ingest_duplicates and ingest_files for one key.

A broken container (missing file, corrupt gzip/zstd stream, Parquet without the text column)
is an input error and stops the run; a broken record is a data error and is quarantined.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import json
import os
import unicodedata
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import polars as pl
import zstandard

from quadflow.log import Progress, get_logger
from quadflow.settings import ConfigError, IngestSettings
from quadflow.store import StageRef, StoreRef, connect, make_ref, run_sql, stage_key
from quadflow.tasking import stage_task
from quadflow.text import count_tokens_expr

VERSION = "ingest-1"
ROLES = ("pool", "target")
REASONS = (
    "malformed_json", "not_an_object", "missing_text", "wrong_type", "empty_text", "undecodable", "oversize",
)

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


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Resolve files, directories (recursive) and globs (with **) to a sorted, de-duplicated file list."""
    out: set[Path] = set()
    for pattern in patterns:
        if "://" in pattern:
            raise InputError(f"input {pattern!r}: only local files, directories and globs are read here")
        expanded = os.path.expanduser(pattern)
        if any(c in expanded for c in "*?["):
            hits = sorted(glob.glob(expanded, recursive=True))
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


@dataclass(frozen=True)
class FileFingerprint:
    """Identity of an input file's content, so the ingest key moves when the content does."""

    path: str
    size: int
    mtime_ns: int
    sha256: str


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


def _byte_chunks(path: Path, compression: str | None) -> Iterator[bytes]:
    """Decompressed content of a file, streamed in chunks of about 1 MiB."""
    if compression == "gzip":
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                yield chunk
    elif compression == "zstd":
        with open(path, "rb") as fh:
            yield from _zstd_chunks(fh)
    else:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                yield chunk


@contextmanager
def _container_errors(path: Path):
    """Turn a file that cannot be opened or decompressed into an InputError naming it."""
    try:
        yield
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
        self.role, self.file, self.source = role, file, Path(file).name
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

    def add(self, line: int, obj: dict, raw: bytes | dict, maybe_surrogate: bool) -> None:
        """Validate one parsed object; keep it as a document or quarantine it with a reason."""
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


def _read_jsonl(path: Path, compression: str | None, col: _Collector, batch_rows: int) -> Iterator[Batch]:
    with _container_errors(path):
        for line_no, raw in _lines(_byte_chunks(path, compression)):
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
                        col.add(line_no, obj, raw, b"\\ud" in raw or b"\\uD" in raw)
                    else:
                        col.bad(line_no, "not_an_object", f"JSON value is a {type(obj).__name__}, not an object", raw)
            if col.pending >= batch_rows:
                yield col.flush()
    if col.records:
        yield col.flush()


def _read_txt(path: Path, compression: str | None, col: _Collector) -> Iterator[Batch]:
    """One document per file; reading stops once the text is known to be oversize."""
    limit = col.max_doc_chars
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts, n, offset, head = [], 0, 0, b""  # offset: bytes of the file decoded before this chunk
    with _container_errors(path):
        try:
            for chunk in _byte_chunks(path, compression):
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _container_errors(path):
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, ValueError) as e:
            raise InputError(f"input {str(path)!r} is not a readable Parquet file: {e}") from None
        names = pf.schema_arrow.names
        if col.text_field not in names:
            raise InputError(
                f"input {str(path)!r} has no text column {col.text_field!r} (columns: {', '.join(names)}); "
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
                        col.add(row, obj, obj, False)
                yield col.flush()
        except pa.ArrowException as e:
            raise InputError(f"input {str(path)!r} cannot be read as Parquet: {e}") from None


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
) -> Iterator[Batch]:
    """Stream one input file as batches of documents and quarantined records (never the whole file)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {ROLES}")
    path = Path(path)
    kind, compression = file_format(path)
    col = _Collector(role, str(path), text_field, id_field, max_doc_chars)
    if kind == "jsonl":
        return _read_jsonl(path, compression, col, batch_rows)
    if kind == "txt":
        return _read_txt(path, compression, col)
    return _read_parquet(path, col, batch_rows)


class Deduplicator:
    """Exact dedup by doc_id within a role: the first copy in (file, line) order is kept."""

    def __init__(self) -> None:
        self.seen_: dict[str, tuple[str, int]] = {}  # doc_id -> (file, line) of the kept copy
        self.n_kept_ = 0

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


# --------------------------------------------------------------------------- task


def _key_file(fp: FileFingerprint) -> dict[str, Any]:
    """What of a file the output depends on (not its mtime: touching a file changes nothing)."""
    d = asdict(fp)
    d.pop("mtime_ns")
    return d


def _check_unchanged(fp: FileFingerprint) -> None:
    try:
        st = os.stat(fp.path)
    except OSError as e:
        raise InputError(f"input {fp.path!r} cannot be read: {e.strerror or e}") from None
    if (st.st_size, st.st_mtime_ns) != (fp.size, fp.mtime_ns):
        raise InputError(f"input {fp.path!r} changed after it was fingerprinted; rerun to pick up the new content")


def _insert(con, name: str, frame: pl.DataFrame, key: str) -> None:
    if frame.height == 0:
        return
    con.register("batch", frame.to_arrow())
    try:
        run_sql(con, name, {"key": key})
    finally:
        con.unregister("batch")


@stage_task("ingest")
def ingest(
    settings: IngestSettings,
    files: tuple[FileFingerprint, ...],
    targets: tuple[FileFingerprint, ...],
    store: StoreRef,
) -> StageRef:
    """Load pool and target files into one ingest partition; bad records are quarantined, not dropped."""
    if not files:
        raise InputError("no pool input files: give at least one input")
    # inputs/targets are represented by the resolved files; batch_rows does not change the output
    section = settings.model_dump(mode="json", exclude={"inputs", "targets", "batch_rows"})
    key = stage_key("ingest", VERSION, section, [_key_file(f) for f in files], [_key_file(f) for f in targets])
    log = get_logger()
    progress = Progress("ingest", total=None, unit="docs")
    reasons: Counter[str] = Counter()
    with connect(store) as con:
        run_sql(con, "ingest_schema")
        con.execute("begin transaction")
        try:
            run_sql(con, "ingest_delete", {"key": key})
            for role, fps in (("pool", files), ("target", targets)):
                dedup = Deduplicator()
                for fp in fps:
                    _check_unchanged(fp)
                    counts = Counter()
                    batches = read_file(
                        fp.path, role, settings.text_field, settings.id_field, settings.max_doc_chars,
                        settings.batch_rows,
                    )
                    for batch in batches:
                        kept, dups = dedup.update(batch.good)
                        _insert(con, "ingest_insert_docs", kept, key)
                        _insert(con, "ingest_insert_quarantine", batch.bad, key)
                        _insert(con, "ingest_insert_duplicates", dups, key)
                        counts.update(records=batch.records, ingested=kept.height, quarantined=batch.bad.height,
                                      duplicates=dups.height)
                        reasons.update(batch.bad["reason"].to_list())
                        progress.update(batch.records)
                    file_row = pl.DataFrame(
                        [{"role": role, "file": fp.path, "size_bytes": fp.size, "sha256": fp.sha256,
                          "records": counts["records"], "ingested": counts["ingested"],
                          "quarantined": counts["quarantined"], "duplicates": counts["duplicates"]}]
                    )
                    _insert(con, "ingest_insert_files", file_row, key)
            con.execute("commit")
        except BaseException:
            con.execute("rollback")
            raise
        progress.close()
        if reasons:
            summary = ", ".join(f"{r}={n:,}" for r, n in sorted(reasons.items()))
            log.warning(f"ingest: quarantined {sum(reasons.values()):,} records ({summary}); see ingest_quarantine")
        return make_ref(con, "ingest", key, store, "ingest_docs", ["role", "doc_idx", "doc_id", "n_tokens"])
