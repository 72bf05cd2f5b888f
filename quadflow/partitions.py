"""Date partitions: `<root>/date=YYYY-MM-DD/` directories or s3:// prefixes, one curation run per date.

In partition runs `settings.ingest.inputs` name partition ROOTS (local directories or s3://
prefixes). The run for date d curates `<root>/date=<d>/` of every root that has it, into its own store
`<dirname(settings.store)>/partitions/date=<d>.duckdb` (different dates never share a DuckDB
file) and its own output `<settings.export.output>/date=<d>/`. A partition is done when that
output has a manifest that verifies and that records exactly the settings of the run, so a
changed setting (or a changed input file) makes every partition due again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import date
from pathlib import Path
from typing import Any, Iterable

from quadflow import objectstore as ob
from quadflow.settings import ConfigError, Settings

PARTITION_PREFIX = "date="
_PARTITION_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
STORES_DIR = "partitions"  # per-partition stores live here, next to settings.store


def partition_name(d: date) -> str:
    """The directory (and store file stem) name of a partition: date=YYYY-MM-DD."""
    return f"{PARTITION_PREFIX}{d.isoformat()}"


def _parse_dir(name: str, root: str) -> date | None:
    m = _PARTITION_DIR.match(name)
    if m is None:
        return None
    try:
        return date.fromisoformat(m.group(1))
    except ValueError:
        raise ConfigError(f"partition root {root!r} holds {name!r}, which is not a valid date") from None


def list_partitions(root: str | Path, objectstore: ob.ObjectStoreSettings | None = None) -> list[date]:
    """Sorted dates of the `date=YYYY-MM-DD` directories (or s3:// prefixes) directly under `root`.

    Other entries (files, hidden or differently named directories) are not partitions and are
    ignored; a `date=` directory with an impossible date is a ConfigError naming it. This is the
    one place that lists a root.
    """
    root_s = str(root)
    if ob.is_s3(root_s):
        return _list_s3_partitions(root_s, objectstore)
    if "://" in root_s:
        raise ConfigError(f"partition root {root_s!r}: only local directories and s3:// prefixes are supported")
    p = Path(root_s).expanduser()
    if not p.is_dir():
        raise ConfigError(f"partition root {root_s!r} is not a directory")
    found = set()
    with os.scandir(p) as entries:
        for entry in entries:
            if entry.is_dir():
                d = _parse_dir(entry.name, root_s)
                if d is not None:
                    found.add(d)
    return sorted(found)


def _list_s3_partitions(root: str, objectstore: ob.ObjectStoreSettings | None) -> list[date]:
    """Dates of the `date=YYYY-MM-DD/` prefixes directly under an s3:// root (from its object keys)."""
    bucket, prefix = ob.parse(root)
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    found = set()
    for info in ob.list_prefix(ob.client(objectstore), bucket, prefix):
        first = info.key[len(prefix):].split("/", 1)
        if len(first) == 2:  # an object inside a sub-prefix, not directly under the root
            d = _parse_dir(first[0], root)
            if d is not None:
                found.add(d)
    return sorted(found)


def all_partitions(roots: Iterable[str | Path], objectstore: ob.ObjectStoreSettings | None = None) -> list[date]:
    """Sorted union of the partitions of every root."""
    out: set[date] = set()
    for root in roots:
        out.update(list_partitions(root, objectstore))
    return sorted(out)


def newest_partition(roots: Iterable[str | Path], objectstore: ob.ObjectStoreSettings | None = None) -> date:
    """The newest date any root holds; ConfigError when the roots hold no partition at all."""
    roots = list(roots)
    dates = all_partitions(roots, objectstore)
    if not dates:
        raise ConfigError(f"partition roots {roots!r} hold no date=YYYY-MM-DD directory")
    return dates[-1]


def partitions_between(roots: Iterable[str | Path], start: date, end: date,
                       objectstore: ob.ObjectStoreSettings | None = None) -> list[date]:
    """Existing partitions with start <= date <= end (both inclusive), oldest first."""
    if start > end:
        raise ConfigError(f"backfill start {start.isoformat()} is after end {end.isoformat()}")
    return [d for d in all_partitions(roots, objectstore) if start <= d <= end]


def _child(location: str, name: str) -> str:
    """`location/name`: a path for local directories, a prefix URL (trailing /) for s3://."""
    if ob.is_s3(location):
        return f"{location.rstrip('/')}/{name}/"
    return str(Path(location) / name)


def partition_settings(settings: Settings, d: date) -> Settings:
    """The settings of the run over partition `d`: its input dirs, its own store and output."""
    name = partition_name(d)
    inputs = [_child(root, name) for root in settings.ingest.inputs
              if (d in list_partitions(root, settings.objectstore) if ob.is_s3(root) else (Path(root) / name).is_dir())]
    if not inputs:
        raise ConfigError(
            f"partition {d.isoformat()}: none of the roots {settings.ingest.inputs!r} has a {name} directory"
        )
    store = Path(settings.store).parent / STORES_DIR / f"{name}.duckdb"
    output = _child(settings.export.output, name)
    data = settings.model_dump(mode="json")
    data["store"] = str(store)
    data["ingest"]["inputs"] = inputs
    data["export"]["output"] = str(output)
    return Settings.model_validate(data)


def _digest(settings_json: Any) -> str:
    text = json.dumps(settings_json, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def settings_digest(settings: Settings) -> str:
    """sha256 of the canonical JSON of the settings (sorted keys, no whitespace)."""
    return _digest(settings.model_dump(mode="json"))


def lock_path(settings: Settings) -> Path:
    """The advisory lock file that serializes runs over one store: `<store>.lock`."""
    from quadflow.locking import store_lock_path

    return store_lock_path(settings.store)


def _current_inputs(settings: Settings) -> list[tuple[str, int]]:
    """(path or URL, size) of the inputs there now: a stat or a listing, no reading."""
    from quadflow.tasks.ingest import expand_inputs, resolve_files

    local = [p for p in settings.ingest.inputs if not ob.is_s3(p)]
    remote = [p for p in settings.ingest.inputs if ob.is_s3(p)]
    found = [(str(p), p.stat().st_size) for p in expand_inputs(local)] if local else []
    if remote:  # objects: size from the listing (resolve_files reads nothing)
        found += [(str(f.path), int(f.size)) for f in resolve_files(remote, settings.objectstore)]
    return sorted(found)


def not_done_reason(settings: Settings) -> str | None:
    """Why the run described by `settings` still has to happen, or None when its output is done.

    Done means: the output's manifest verifies (every file matches its checksum), it records
    exactly these settings, and the pool files it lists are the ones there now (path and size),
    so a partition that received a late file is due again.
    """
    from quadflow.tasks.export import OutputError, verify_output

    try:
        manifest = verify_output(settings.export.output, settings.objectstore)
    except OutputError as e:
        return f"no verified output: {e}"
    recorded = manifest.get("settings")
    if not isinstance(recorded, dict) or _digest(recorded) != settings_digest(settings):
        return f"the manifest in {settings.export.output} was written with different settings"
    listed = manifest.get("inputs", {}).get("pool", [])
    try:
        then = sorted((str(f["path"]), int(f["size"])) for f in listed)
    except (KeyError, TypeError, ValueError):
        return f"the manifest in {settings.export.output} does not list its input files"
    try:
        now = _current_inputs(settings)
    except ConfigError as e:  # an input directory emptied or unreadable since the publish
        return f"the input files cannot be listed: {e}"
    if then != now:
        return f"the input files changed since {settings.export.output} was published"
    return None


def is_done(settings: Settings) -> bool:
    """True when the run described by `settings` (a partition's settings) has a current, verified output."""
    return not_done_reason(settings) is None


def manifest_counts(settings: Settings) -> dict[str, Any]:
    """docs, tokens and manifest path of a published output (after verifying it)."""
    from quadflow.tasks.export import MANIFEST, verify_output

    manifest = verify_output(settings.export.output, settings.objectstore)
    counts = manifest.get("counts", {})
    out = settings.export.output
    output = out if ob.is_s3(out) else str(Path(out).absolute())
    return {
        "docs": int(counts.get("selected_docs", 0)),
        "tokens": int(counts.get("selected_tokens", 0)),
        "output": output,
        "manifest": _child(output, MANIFEST).rstrip("/"),
    }
