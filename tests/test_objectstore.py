"""The object-store layer against a real S3 endpoint (moto on loopback), with and without faults."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import uuid

import pytest
import zstandard
from hypothesis import given, strategies as st
from pydantic import ValidationError

from quadflow import objectstore as ob
from quadflow.settings import ConfigError
from tests.s3util import TEST_ACCESS_KEY, TEST_SECRET_KEY, loopback_settings

MiB = 1024 * 1024
SEGMENT = st.text(alphabet=st.characters(blacklist_characters="/*?[]\\", blacklist_categories=("Cs",)),
                  min_size=1, max_size=8)


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def assert_clean(message: str, *secrets: str) -> None:
    """No credential, raw or URL-encoded, in a message a user will see."""
    for secret in (TEST_SECRET_KEY, *secrets):
        for form in (secret, secret.replace("/", "%2F").replace("+", "%2B")):
            assert form not in message


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def test_parse_and_is_s3():
    assert ob.is_s3("s3://bucket/a/b.jsonl.zst") and ob.is_s3("S3://bucket")
    assert not ob.is_s3("/data/s3://x") and not ob.is_s3("data.jsonl")
    key = "raw/date=2026-11-01/part-0.jsonl.zst"
    assert ob.parse(f"s3://bucket/{key}") == ("bucket", key)
    assert ob.parse("s3://bucket") == ("bucket", "")
    for bad in ("s3:///key", "http://bucket/key", "s3:// b/k"):
        with pytest.raises(ConfigError, match="s3://"):
            ob.parse(bad)


def test_glob_segments_and_double_star():
    rx = ob.glob_to_regex("raw/date=2026-11-*/*.jsonl.zst")
    assert rx.match("raw/date=2026-11-03/part-0.jsonl.zst")
    assert not rx.match("raw/date=2026-11-03/sub/part-0.jsonl.zst")  # '*' stays in its segment
    assert not rx.match("raw/date=2026-12-03/part-0.jsonl.zst")
    deep = ob.glob_to_regex("raw/**/*.parquet")
    assert deep.match("raw/a.parquet") and deep.match("raw/x/y/a.parquet")
    assert not deep.match("other/a.parquet")
    assert ob.glob_to_regex("p/file-[0-2].txt").match("p/file-1.txt")
    assert not ob.glob_to_regex("p/file-[!0-2].txt").match("p/file-1.txt")
    assert ob.literal_prefix("raw/date=2026-11-*/*.jsonl.zst") == "raw/date=2026-11-"
    assert ob.literal_prefix("plain/key") == "plain/key"


@given(st.lists(SEGMENT, min_size=1, max_size=4), SEGMENT)
def test_glob_literal_matches_only_itself_and_star_one_segment(segments, extra):
    key = "/".join(segments)
    assert ob.glob_to_regex(key).match(key)
    assert not ob.glob_to_regex(key).match(key + extra)
    star = ob.glob_to_regex(segments[0] + "/*")
    assert star.match(f"{segments[0]}/{extra}")
    assert not star.match(f"{segments[0]}/{extra}/{extra}")


@given(st.integers(1, 30), st.floats(0.001, 2.0), st.floats(0.01, 30.0), st.integers(0, 2**32))
def test_backoff_is_full_jitter_within_cap(attempt, base, cap, seed):
    delay = ob.backoff_delay(attempt, base, cap, random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2 ** (attempt - 1))


def test_settings_are_frozen_and_hold_no_credentials():
    s = ob.ObjectStoreSettings(endpoint_url="http://127.0.0.1:9000")
    with pytest.raises(ValidationError):
        s.region = "eu-west-1"
    with pytest.raises(ValidationError, match="aws_secret_access_key"):
        ob.ObjectStoreSettings(aws_secret_access_key="x")
    with pytest.raises(ValidationError, match="endpoint_url"):
        ob.ObjectStoreSettings(endpoint_url="127.0.0.1:9000")
    with pytest.raises(ValidationError):
        ob.ObjectStoreSettings(multipart_chunksize=1 * MiB)  # below S3's 5 MiB part minimum


def test_redact_env_and_session_credentials(s3_env, tmp_path, monkeypatch):
    profile_secret = "ProfileSecret/Only+In+Credentials+File0"
    creds = tmp_path / "credentials"
    creds.write_text(f"[other]\naws_access_key_id = AKIAPROFILEKEY000002\naws_secret_access_key = {profile_secret}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_SESSION_TOKEN", "SessionTokenValue1234567890")
    c = ob.client(ob.ObjectStoreSettings(profile="other", endpoint_url="http://127.0.0.1:9"))
    text = (f"key={TEST_SECRET_KEY} enc={TEST_SECRET_KEY.replace('/', '%2F').replace('+', '%2B')} "
            f"token=SessionTokenValue1234567890 id={TEST_ACCESS_KEY} profile={profile_secret} keep=this")
    out = ob.redact(text, c.session)
    assert_clean(out, "SessionTokenValue1234567890", TEST_ACCESS_KEY, profile_secret)
    assert out.endswith("keep=this") and out.count("[redacted]") == 5
    assert_clean(str(ob.ObjectStoreError(f"denied with {profile_secret}")), profile_secret)  # errors redact
    assert_clean(str(ob.ObjectStoreIOError(f"reset, token {TEST_SECRET_KEY}")))


def test_unknown_profile_is_a_config_error(s3_env):
    with pytest.raises(ConfigError, match="'nope'.*~/.aws/config"):
        ob.client(ob.ObjectStoreSettings(profile="nope"))


# ---------------------------------------------------------------------------------------------
# Listing and globs against moto
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def store(s3_settings):
    return ob.client(s3_settings, seed=0)


def put_keys(c, bucket, keys, data=b"x"):
    for key in keys:
        ob.put_bytes(c, data, f"s3://{bucket}/{key}")


def test_expand_prefix_key_directory_and_glob(store, s3_bucket, s3_admin):
    keys = ["raw/date=2026-11-01/a.jsonl.zst", "raw/date=2026-11-01/b.jsonl.zst",
            "raw/date=2026-11-02/c.jsonl.zst", "raw/date=2026-11-02/nested/d.jsonl.zst",
            "raw/date=2026-12-01/e.jsonl.zst", "raw/date=2026-11-01/notes.txt"]
    put_keys(store, s3_bucket, keys)
    s3_admin.put_object(Bucket=s3_bucket, Key="raw/date=2026-11-01/", Body=b"")  # a console "folder"
    b = f"s3://{s3_bucket}"

    under = [o.key for o in ob.expand(store, f"{b}/raw/date=2026-11-01/")]
    assert under == ["raw/date=2026-11-01/a.jsonl.zst", "raw/date=2026-11-01/b.jsonl.zst",
                     "raw/date=2026-11-01/notes.txt"]
    one = ob.expand(store, f"{b}/raw/date=2026-11-02/c.jsonl.zst")
    assert [(o.key, o.size, o.url) for o in one] == [(keys[2], 1, f"{b}/{keys[2]}")]
    assert one[0].etag == hashlib.md5(b"x").hexdigest()
    assert [o.key for o in ob.expand(store, f"{b}/raw/date=2026-11-02")] == keys[2:4]  # a "directory"
    glob = [o.key for o in ob.expand(store, f"{b}/raw/date=2026-11-*/*.jsonl.zst")]
    assert glob == keys[:3]
    deep = [o.key for o in ob.expand(store, f"{b}/raw/**/*.jsonl.zst")]
    assert deep == sorted(k for k in keys if k.endswith(".jsonl.zst"))
    assert ob.expand(store, f"{b}/raw/date=2027-*/*.jsonl.zst") == []
    with pytest.raises(ob.ObjectStoreError, match="raw/missing.jsonl.*does not exist") as e:
        ob.expand(store, f"{b}/raw/missing.jsonl")
    assert e.value.code == "NoSuchKey" and e.value.bucket == s3_bucket


def test_expand_follows_pagination(store, s3_bucket):
    keys = [f"p/part-{i:02d}.jsonl" for i in range(7)]
    put_keys(store, s3_bucket, keys)
    before = store.counters.calls
    found = ob.expand(store, f"s3://{s3_bucket}/p/", page_size=3)
    assert [o.key for o in found] == keys
    assert store.counters.calls - before == 3  # pages of 3, 3 and 1
    assert [o.key for o in ob.expand(store, f"s3://{s3_bucket}/p/part-0[4-9].jsonl", page_size=3)] == keys[4:]


# ---------------------------------------------------------------------------------------------
# Streaming reads
# ---------------------------------------------------------------------------------------------


def test_streaming_read_equals_bytes_and_wraps_like_a_file(store, s3_bucket, s3_admin):
    data = blob(5 * MiB + 123)
    url = f"s3://{s3_bucket}/big.bin"
    s3_admin.put_object(Bucket=s3_bucket, Key="big.bin", Body=data)
    with ob.open_read(store, url) as f:
        assert isinstance(f.raw, io.RawIOBase) and f.raw.size == len(data)
        chunks = list(iter(lambda: f.read(256 * 1024), b""))
    assert max(map(len, chunks)) <= 256 * 1024 and b"".join(chunks) == data
    with ob.open_read(store, url) as f:  # random access, as Parquet readers need
        f.seek(-100, io.SEEK_END)
        assert f.read() == data[-100:]
        f.seek(4 * MiB)
        assert f.read(10) == data[4 * MiB:4 * MiB + 10] and f.tell() == 4 * MiB + 10

    lines = [json.dumps({"id": i, "text": f"line {i} é"}) for i in range(20_000)]
    raw = "\n".join(lines).encode() + b"\n"
    s3_admin.put_object(Bucket=s3_bucket, Key="docs.jsonl.gz", Body=gzip.compress(raw))
    s3_admin.put_object(Bucket=s3_bucket, Key="docs.jsonl.zst", Body=zstandard.ZstdCompressor().compress(raw))
    with ob.open_read(store, f"s3://{s3_bucket}/docs.jsonl.gz") as f:
        assert [ln.rstrip("\n") for ln in io.TextIOWrapper(gzip.GzipFile(fileobj=f), encoding="utf-8")] == lines
    with ob.open_read(store, f"s3://{s3_bucket}/docs.jsonl.zst") as f:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        assert [ln.rstrip("\n") for ln in text] == lines


def faulty_client(proxy, **overrides):
    # read_timeout < proxy.stall_s, so every stall becomes a client-side timeout.
    proxy.stall_s = 2.0
    return ob.client(loopback_settings(proxy.endpoint, read_timeout=1.0, read_buffer=64 * 1024, **overrides), seed=1)


def test_read_through_faults_returns_exact_bytes(s3_proxy, s3_env, s3_bucket, s3_admin):
    data = blob(3 * MiB + 7, seed=3)
    s3_admin.put_object(Bucket=s3_bucket, Key="faulty.bin", Body=data)
    c = faulty_client(s3_proxy)
    s3_proxy.configure(fault_rate=0.3, seed=7)
    for _ in range(4):
        with ob.open_read(c, f"s3://{s3_bucket}/faulty.bin") as f:
            assert f.read() == data
    faults = sum(n for kind, n in s3_proxy.counts.items() if kind != "ok")
    assert faults > 0 and c.counters.retries > 0
    assert c.counters.retries == c.counters.request_retries + c.counters.stream_resumes


def test_broken_bodies_are_resumed_with_range_requests(s3_proxy, s3_env, s3_bucket, s3_admin):
    data = blob(2 * MiB, seed=4)
    s3_admin.put_object(Bucket=s3_bucket, Key="mid.bin", Body=data)
    c = faulty_client(s3_proxy)
    s3_proxy.configure(fault_rate=0.5, faults=("reset_mid", "stall_mid"), seed=11)
    with ob.open_read(c, f"s3://{s3_bucket}/mid.bin") as f:
        assert f.read() == data
        assert f.raw.resumes > 0
    assert c.counters.stream_resumes == f.raw.resumes
    assert s3_proxy.counts["reset_mid"] + s3_proxy.counts["stall_mid"] > 0


def test_endless_faults_fail_with_a_transient_error_naming_the_object(s3_proxy, s3_env, s3_bucket, s3_admin):
    s3_admin.put_object(Bucket=s3_bucket, Key="down.bin", Body=b"abc")
    c = faulty_client(s3_proxy, max_attempts=2)
    s3_proxy.configure(fault_rate=1.0, faults=("503",))
    with pytest.raises(ob.ObjectStoreIOError, match="down.bin.*SlowDown") as e:
        ob.read_bytes(c, f"s3://{s3_bucket}/down.bin")
    assert_clean(str(e.value))
    assert s3_proxy.counts["503"] == 2 and c.counters.request_retries == 1


def test_changed_object_is_not_stitched_into_a_resumed_read(store, s3_bucket, s3_admin):
    s3_admin.put_object(Bucket=s3_bucket, Key="moving.bin", Body=blob(4 * MiB, seed=1))
    with ob.open_read(store, f"s3://{s3_bucket}/moving.bin") as f:
        f.read(1000)  # buffers the first read_buffer (1 MiB) bytes
        s3_admin.put_object(Bucket=s3_bucket, Key="moving.bin", Body=blob(4 * MiB, seed=2))
        f.seek(3 * MiB)  # past the buffer: the next read requests a range, pinned to the first ETag
        with pytest.raises(ob.ObjectStoreError, match="changed while it was being read"):
            f.read(10)


# ---------------------------------------------------------------------------------------------
# Writes and publishing
# ---------------------------------------------------------------------------------------------


def test_small_object_roundtrip(store, s3_bucket):
    url = f"s3://{s3_bucket}/m/small.json"
    assert not ob.exists(store, url)
    info = ob.put_bytes(store, b'{"a": 1}', url, content_type="application/json")
    assert info.size == 8 and info.etag == hashlib.md5(b'{"a": 1}').hexdigest()
    assert ob.exists(store, url) and ob.read_bytes(store, url) == b'{"a": 1}'
    with pytest.raises(ob.ObjectStoreError, match="over read_bytes' limit"):
        ob.read_bytes(store, url, max_bytes=4)
    ob.delete(store, url)
    ob.delete(store, url)  # deleting a missing key is fine
    assert not ob.exists(store, url)


def test_upload_multipart_above_threshold_and_single_below(s3_settings, s3_bucket, tmp_path):
    c = ob.client(s3_settings.model_copy(update={"multipart_threshold": 5 * MiB, "multipart_chunksize": 5 * MiB}))
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    big.write_bytes(blob(11 * MiB + 5, seed=8))
    small.write_bytes(blob(MiB, seed=9))
    info = ob.upload_file(c, big, f"s3://{s3_bucket}/out/big.bin")
    assert info.size == big.stat().st_size and info.etag.endswith("-3")  # 5 + 5 + 1 MiB parts
    assert info.etag == ob.expected_etag(big, 5 * MiB, 5 * MiB)
    assert ob.read_bytes(c, info.url) == big.read_bytes()
    one = ob.upload_file(c, small, f"s3://{s3_bucket}/out/small.bin")
    assert one.etag == hashlib.md5(small.read_bytes()).hexdigest()


def test_republish_copies_multipart_objects_into_place_with_the_upload_etag(s3_settings, s3_bucket, tmp_path):
    c = ob.client(s3_settings.model_copy(update={"multipart_threshold": 5 * MiB, "multipart_chunksize": 5 * MiB}))
    first, second = tmp_path / "v1", tmp_path / "v2"
    write_output(first, {"sel.parquet": blob(MiB, seed=1)}, {"version": 1})
    write_output(second, {"sel.parquet": blob(11 * MiB + 5, seed=2)}, {"version": 2})
    prefix = f"s3://{s3_bucket}/mp"
    ob.publish_prefix(c, first, prefix)
    result = ob.publish_prefix(c, second, prefix)
    (obj,) = result.objects
    # the server-side copy used the upload's part size, so the ETag is the one the manifest can check
    assert obj.key == "mp/sel.parquet" and obj.etag == ob.expected_etag(second / "sel.parquet", 5 * MiB, 5 * MiB)
    assert obj.etag.endswith("-3")
    assert ob.read_bytes(c, obj.url) == (second / "sel.parquet").read_bytes()
    assert ob.read_manifest(c, prefix) == {"version": 2}


def test_multipart_upload_through_faults(s3_proxy, s3_env, s3_bucket, tmp_path):
    c = faulty_client(s3_proxy, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2)
    path = tmp_path / "part.bin"
    path.write_bytes(blob(10 * MiB + 1, seed=5))
    s3_proxy.configure(fault_rate=0.3, faults=("500", "503", "reset"), seed=2)
    info = ob.upload_file(c, path, f"s3://{s3_bucket}/faulty/part.bin")
    assert info.etag.endswith("-3") and c.counters.request_retries > 0
    s3_proxy.configure(fault_rate=0.0)
    assert ob.read_bytes(c, info.url) == path.read_bytes()


def write_output(root, files, manifest):
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "manifest.json").write_text(json.dumps(manifest))


def writes(proxy):
    return [(r.method, r.path.split("?")[0]) for r in proxy.log if r.method in ("PUT", "POST", "DELETE")]


def test_publish_writes_manifest_last_and_removes_the_old_one_first(s3_proxy, s3_env, s3_bucket, tmp_path):
    c = faulty_client(s3_proxy)
    first, second = tmp_path / "v1", tmp_path / "v2"
    write_output(first, {"part-0.parquet": b"a" * 100, "part-1.parquet": b"b" * 50, "plots/k.png": b"png"},
                 {"version": 1})
    prefix = f"s3://{s3_bucket}/exports/run"
    manifest_path = f"/{s3_bucket}/exports/run/manifest.json"

    assert ob.read_manifest(c, prefix) is None
    result = ob.publish_prefix(c, first, prefix)
    assert not result.replaced and result.stale == ()
    assert sorted(o.key for o in result.objects) == [
        "exports/run/part-0.parquet", "exports/run/part-1.parquet", "exports/run/plots/k.png"]
    log = writes(s3_proxy)
    assert log[-1] == ("PUT", manifest_path) and len(log) == 4
    assert ob.read_manifest(c, prefix + "/") == {"version": 1}

    s3_proxy.log.clear()
    write_output(second, {"part-0.parquet": b"c" * 80}, {"version": 2})
    result = ob.publish_prefix(c, second, prefix)
    log = writes(s3_proxy)
    # a republish stages its files aside first; the old manifest goes only once they are all up
    assert result.replaced and log[-1] == ("PUT", manifest_path)
    swap = log.index(("DELETE", manifest_path))
    assert log[0][0] == "PUT" and log[0][1].startswith(f"/{s3_bucket}/exports/run/{ob.STAGING}") and swap == 1
    assert ("PUT", f"/{s3_bucket}/exports/run/part-0.parquet") in log[swap:]
    assert ob.expand(c, f"{prefix}/{ob.STAGING}") == []  # staged copies removed
    assert set(result.stale) == {f"{prefix}/part-1.parquet", f"{prefix}/plots/k.png"}
    assert ob.read_manifest(c, prefix) == {"version": 2}
    assert ob.read_bytes(c, f"{prefix}/part-0.parquet") == b"c" * 80
    ob.publish_prefix(c, second, prefix, delete_stale=True)
    assert [o.key for o in ob.expand(c, prefix + "/")] == ["exports/run/manifest.json", "exports/run/part-0.parquet"]


def test_failed_publish_leaves_no_manifest(s3_proxy, s3_env, s3_bucket, tmp_path):
    c = faulty_client(s3_proxy)
    out = tmp_path / "out"
    write_output(out, {"a.jsonl": b"1\n", "b.jsonl": b"2\n"}, {"version": 1})
    prefix = f"s3://{s3_bucket}/pub"
    s3_proxy.respond_with_error(lambda method, path: method == "PUT" and path.startswith(f"/{s3_bucket}/pub/b.jsonl"))
    with pytest.raises(ob.ObjectStoreError, match="access denied: write s3://.*/pub/b.jsonl") as e:
        ob.publish_prefix(c, out, prefix)
    assert e.value.code == "AccessDenied" and e.value.bucket == s3_bucket
    s3_proxy.respond_with_error(None)
    assert ob.read_manifest(c, prefix) is None  # readers see "not published", never a half


def test_a_failed_republish_leaves_the_previous_output_published(s3_proxy, s3_env, s3_bucket, tmp_path):
    c = faulty_client(s3_proxy)
    first, second = tmp_path / "v1", tmp_path / "v2"
    write_output(first, {"a.jsonl": b"1\n", "b.jsonl": b"2\n"}, {"version": 1})
    write_output(second, {"a.jsonl": b"3\n", "b.jsonl": b"4\n"}, {"version": 2})
    prefix = f"s3://{s3_bucket}/pub"
    ob.publish_prefix(c, first, prefix)
    # the second file's upload is refused: the first was already staged, nothing published was touched
    s3_proxy.respond_with_error(lambda method, path: method == "PUT" and path.endswith("/b.jsonl"))
    with pytest.raises(ob.ObjectStoreError, match=f"access denied: write s3://.*/pub/{ob.STAGING}.*/b.jsonl"):
        ob.publish_prefix(c, second, prefix)
    s3_proxy.respond_with_error(None)
    assert ob.read_manifest(c, prefix) == {"version": 1}
    assert ob.read_bytes(c, f"{prefix}/a.jsonl") == b"1\n" and ob.read_bytes(c, f"{prefix}/b.jsonl") == b"2\n"
    assert [o.key.rsplit("/", 1)[1] for o in ob.expand(c, f"{prefix}/{ob.STAGING}")] == ["a.jsonl"]

    result = ob.publish_prefix(c, second, prefix)  # the next publish clears what the failed one staged
    assert result.replaced and result.stale == ()
    assert ob.read_manifest(c, prefix) == {"version": 2}
    assert ob.read_bytes(c, f"{prefix}/a.jsonl") == b"3\n" and ob.read_bytes(c, f"{prefix}/b.jsonl") == b"4\n"
    assert sorted(o.key for o in ob.expand(c, prefix + "/")) == ["pub/a.jsonl", "pub/b.jsonl", "pub/manifest.json"]


def test_publish_refuses_a_bad_local_manifest(store, s3_bucket, tmp_path):
    (tmp_path / "part.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ob.publish_prefix(store, tmp_path, f"s3://{s3_bucket}/x")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ob.publish_prefix(store, tmp_path, f"s3://{s3_bucket}/x")
    assert ob.expand(store, f"s3://{s3_bucket}/x/") == []  # nothing uploaded before the check


# ---------------------------------------------------------------------------------------------
# Permanent errors: named, actionable, no secrets
# ---------------------------------------------------------------------------------------------


def test_missing_bucket_is_named(store, tmp_path):
    missing = f"qf-missing-{uuid.uuid4().hex[:8]}"
    (tmp_path / "f.bin").write_bytes(b"x")
    calls = [lambda: ob.expand(store, f"s3://{missing}/raw/"), lambda: ob.open_read(store, f"s3://{missing}/k"),
             lambda: ob.exists(store, f"s3://{missing}/k"), lambda: ob.put_bytes(store, b"x", f"s3://{missing}/k"),
             lambda: ob.upload_file(store, tmp_path / "f.bin", f"s3://{missing}/k")]
    for call in calls:
        with pytest.raises(ob.ObjectStoreError) as e:
            call()
        assert isinstance(e.value, ConfigError) and e.value.code == "NoSuchBucket"
        assert f"bucket {missing!r} does not exist" in str(e.value) and "endpoint URL" in str(e.value)
        assert_clean(str(e.value))


def test_an_endpoint_from_aws_endpoint_url_is_the_one_errors_name(s3_server, s3_env, monkeypatch):
    # boto3 reads AWS_ENDPOINT_URL itself; errors used to say "at AWS S3" for a store that is not AWS
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    settings = loopback_settings(s3_server).model_copy(update={"endpoint_url": None})
    c = ob.client(settings)
    missing = f"qf-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ob.ObjectStoreError, match=f"bucket {missing!r} does not exist at {s3_server}:") as e:
        ob.expand(c, f"s3://{missing}/raw/")
    assert "AWS S3" not in str(e.value)
    assert ob.endpoint_of(settings) == s3_server
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert ob.endpoint_of(settings) is None and ob.client(settings).endpoint == "AWS S3 (us-east-1)"


def test_access_denied_from_iam(moto_auth, s3_settings, s3_bucket, s3_admin, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_auth["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_auth["secret_key"])
    c = ob.client(s3_settings)
    assert ob.expand(c, f"s3://{s3_bucket}/") == []  # listing is allowed
    for call in (lambda: ob.read_bytes(c, f"s3://{s3_bucket}/k"), lambda: ob.exists(c, f"s3://{s3_bucket}/k"),
                 lambda: ob.put_bytes(c, b"x", f"s3://{s3_bucket}/k")):
        with pytest.raises(ob.ObjectStoreError, match=f"access denied: .* s3://{s3_bucket}/k .*environment") as e:
            call()
        assert_clean(str(e.value), moto_auth["secret_key"], moto_auth["access_key"])


def test_bad_credentials_name_the_source_not_the_secret(moto_auth, s3_settings, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_auth["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)  # not this key's secret
    with pytest.raises(ob.ObjectStoreError, match="secret key from the environment .* does not match") as e:
        ob.expand(ob.client(s3_settings), f"s3://{s3_bucket}/")
    assert e.value.code == "SignatureDoesNotMatch" and s3_bucket in str(e.value)
    assert_clean(str(e.value) + repr(e.value), moto_auth["secret_key"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)  # unknown to the store
    with pytest.raises(ob.ObjectStoreError, match="access key from the environment .* is not known") as e:
        ob.read_bytes(ob.client(s3_settings), f"s3://{s3_bucket}/k")
    assert e.value.code == "InvalidAccessKeyId" and f"s3://{s3_bucket}/k" in str(e.value)
    assert_clean(str(e.value))


def test_access_denied_on_head_without_body(s3_proxy, s3_env, s3_bucket):
    c = faulty_client(s3_proxy)
    s3_proxy.respond_with_error(lambda method, path: method == "HEAD")
    with pytest.raises(ob.ObjectStoreError, match=f"access denied: read s3://{s3_bucket}/secret.bin"):
        ob.exists(c, f"s3://{s3_bucket}/secret.bin")


def test_no_credentials_is_a_config_error(s3_settings, s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ob.ObjectStoreError, match="no usable AWS credentials.*AWS_PROFILE"):
        ob.expand(ob.client(s3_settings), f"s3://{s3_bucket}/")
