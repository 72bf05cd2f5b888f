"""Date partitions: listing, newest, per-partition settings, the settings digest and `is_done`."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from quadflow.partitions import (
    all_partitions,
    is_done,
    list_partitions,
    lock_path,
    manifest_counts,
    newest_partition,
    not_done_reason,
    partition_settings,
    partitions_between,
    settings_digest,
)
from quadflow.settings import ConfigError, Settings, build_settings
from quadflow.tasks.export import sha256_file, write_manifest

D19, D20, D21 = date(2026, 11, 19), date(2026, 11, 20), date(2026, 11, 21)


def _root(tmp_path: Path, name: str, dates: list[date]) -> Path:
    root = tmp_path / name
    for d in dates:
        part = root / f"date={d.isoformat()}"
        part.mkdir(parents=True)
        (part / "part-0.jsonl").write_text(json.dumps({"id": f"{name}-{d}", "text": f"document of {d}"}) + "\n")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _settings(tmp_path: Path, *roots: Path, budget: int = 30_000) -> Settings:
    return build_settings(overrides={
        "store": str(tmp_path / "work" / "quadflow.duckdb"),
        "ingest": {"inputs": [str(r) for r in roots]},
        "select": {"budget_tokens": budget},
        "export": {"output": str(tmp_path / "out")},
    })


def _publish_fake(ps: Settings, rows: int = 3, tokens: int = 120) -> Path:
    """What export leaves behind: a selection file and a manifest recording settings and inputs."""
    from quadflow.tasks.ingest import expand_inputs

    out = Path(ps.export.output)
    out.mkdir(parents=True)
    sel = out / "selection.jsonl"
    sel.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(rows)))
    manifest = {
        "settings": ps.model_dump(mode="json"),
        "inputs": {"pool": [{"path": str(p), "size": p.stat().st_size, "mtime_ns": 0, "sha256": "x"}
                            for p in expand_inputs(ps.ingest.inputs)], "target": []},
        "counts": {"selected_docs": rows, "selected_tokens": tokens},
        "outputs": [{"path": sel.name, "sha256": sha256_file(sel), "bytes": sel.stat().st_size, "rows": rows}],
    }
    write_manifest(out / "manifest.json", manifest)
    return out


# ------------------------------------------------------------------------------- listing


def test_list_partitions_reads_only_date_directories(tmp_path):
    root = _root(tmp_path, "pool", [D21, D19])
    (root / "date=2026-11-20").write_text("a file, not a partition")
    (root / "other").mkdir()
    (root / ".date=2026-11-22.tmp").mkdir()
    (root / "date=2026-11-23-extra").mkdir()
    assert list_partitions(root) == [D19, D21]
    (tmp_path / "empty-root").mkdir()
    assert list_partitions(tmp_path / "empty-root") == []


def test_list_partitions_rejects_impossible_dates_and_bad_roots(tmp_path):
    root = _root(tmp_path, "pool", [D19])
    (root / "date=2026-13-01").mkdir()
    with pytest.raises(ConfigError, match=r"date=2026-13-01"):
        list_partitions(root)
    with pytest.raises(ConfigError, match="not a directory"):
        list_partitions(tmp_path / "missing")
    with pytest.raises(ConfigError, match="ftp://host/pool"):
        list_partitions("ftp://host/pool")


def test_newest_and_range_span_every_root(tmp_path):
    a = _root(tmp_path, "a", [D19, D20])
    b = _root(tmp_path, "b", [D20, D21])
    assert all_partitions([a, b]) == [D19, D20, D21]
    assert newest_partition([a, b]) == D21
    assert partitions_between([a, b], D20, D21) == [D20, D21]
    assert partitions_between([a, b], D19, D19) == [D19]  # both ends inclusive
    assert partitions_between([a, b], date(2026, 12, 1), date(2026, 12, 31)) == []
    with pytest.raises(ConfigError, match="2026-11-21 is after end 2026-11-19"):
        partitions_between([a], D21, D19)
    with pytest.raises(ConfigError, match="no date=YYYY-MM-DD"):
        newest_partition([_root(tmp_path, "empty", [])])


# ------------------------------------------------------------------------------- settings


def test_partition_settings_point_at_the_partition_its_store_and_output(tmp_path):
    a = _root(tmp_path, "a", [D19, D20])
    b = _root(tmp_path, "b", [D20])
    s = _settings(tmp_path, a, b)
    ps = partition_settings(s, D20)
    assert ps.ingest.inputs == [str(a / "date=2026-11-20"), str(b / "date=2026-11-20")]
    assert ps.store == str(tmp_path / "work" / "partitions" / "date=2026-11-20.duckdb")
    assert ps.export.output == str(tmp_path / "out" / "date=2026-11-20")
    assert lock_path(ps) == Path(ps.store + ".lock")
    assert ps.select == s.select and ps.seed == s.seed  # everything else is carried over
    # A root without the partition is left out; a partition no root has is an error.
    assert partition_settings(s, D19).ingest.inputs == [str(a / "date=2026-11-19")]
    with pytest.raises(ConfigError, match="2026-11-21"):
        partition_settings(s, D21)
    # Different partitions never share a store or an output.
    assert partition_settings(s, D19).store != ps.store
    assert partition_settings(s, D19).export.output != ps.export.output


def test_settings_digest_is_canonical(tmp_path):
    a = _root(tmp_path, "a", [D19])
    s = _settings(tmp_path, a)
    same = Settings.model_validate(json.loads(json.dumps(s.model_dump(mode="json"), sort_keys=True)))
    assert settings_digest(s) == settings_digest(same)
    assert len(settings_digest(s)) == 64
    assert settings_digest(s) != settings_digest(_settings(tmp_path, a, budget=30_001))


@hsettings(max_examples=25, deadline=None)
@given(st.integers(1, 10**9), st.integers(1, 10**9), st.integers(0, 10))
def test_digest_moves_exactly_when_a_setting_does(b1, b2, seed):
    s1 = Settings(ingest={"inputs": ["root"]}, select={"budget_tokens": b1}, seed=seed)
    s2 = Settings(ingest={"inputs": ["root"]}, select={"budget_tokens": b2}, seed=seed)
    assert (settings_digest(s1) == settings_digest(s2)) == (b1 == b2)


# ------------------------------------------------------------------------------- is_done


def test_is_done_needs_a_verified_manifest_with_the_same_settings_and_inputs(tmp_path):
    a = _root(tmp_path, "a", [D19, D20])
    ps = partition_settings(_settings(tmp_path, a), D19)
    assert not is_done(ps)
    assert "no verified output" in not_done_reason(ps)

    out = _publish_fake(ps)
    assert is_done(ps)
    assert manifest_counts(ps) == {"docs": 3, "tokens": 120, "output": str(out), "manifest": str(out / "manifest.json")}
    # Another partition is not done because this one is.
    assert not is_done(partition_settings(_settings(tmp_path, a), D20))
    # Changed settings: due again.
    other = partition_settings(_settings(tmp_path, a, budget=50_000), D19)
    assert "different settings" in not_done_reason(other)
    # A late file in the partition: due again.
    late = Path(ps.ingest.inputs[0]) / "part-1.jsonl"
    late.write_text(json.dumps({"text": "late"}) + "\n")
    assert "input files changed" in not_done_reason(ps)
    late.unlink()
    assert is_done(ps)
    # A selection file that no longer matches its manifest: due again.
    (out / "selection.jsonl").write_text("tampered\n")
    assert "no verified output" in not_done_reason(ps)
    (out / "manifest.json").unlink()
    assert not is_done(ps)


def test_s3_roots_list_date_prefixes_and_map_to_partition_urls(tmp_path, s3_settings, s3_admin, s3_bucket):
    for key in ("pool/date=2026-11-19/a.jsonl", "pool/date=2026-11-21/b.jsonl", "pool/date=2026-11-20/x/y.jsonl",
                "pool/readme.txt", "pool/undated/c.jsonl", "other/date=2026-11-22/d.jsonl"):
        s3_admin.put_object(Bucket=s3_bucket, Key=key, Body=b'{"text": "a document"}\n')
    root = f"s3://{s3_bucket}/pool"
    assert list_partitions(root, s3_settings) == [D19, D20, D21]
    assert list_partitions(root + "/", s3_settings) == [D19, D20, D21]

    settings = build_settings(overrides={
        "store": str(tmp_path / "work" / "quadflow.duckdb"),
        "ingest": {"inputs": [root]}, "export": {"output": f"s3://{s3_bucket}/curated"},
        "objectstore": s3_settings.model_dump(),
    })
    ps = partition_settings(settings, D20)
    assert ps.ingest.inputs == [f"s3://{s3_bucket}/pool/date=2026-11-20/"]
    assert ps.export.output == f"s3://{s3_bucket}/curated/date=2026-11-20/"
    assert ps.store == str(tmp_path / "work" / "partitions" / "date=2026-11-20.duckdb")  # stores stay local
    assert not is_done(ps)  # nothing published under the output prefix yet
    with pytest.raises(ConfigError, match="date=2026-11-22"):
        partition_settings(settings, date(2026, 11, 22))  # only the other root has it
