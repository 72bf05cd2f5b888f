"""Object-store I/O for s3:// inputs and outputs, on AWS or any S3-compatible endpoint.

boto3 does every request. Two layers of retry keep a long read alive: botocore retries each
request (5xx, SlowDown/throttling, connection resets, timeouts; mode "standard" or "adaptive"),
and `S3ObjectReader` resumes a body that breaks mid-stream with a Range request from the byte
offset already read. Both are counted on the client (`client.counters`), so a run can report
"N retries". Permanent failures raise `ObjectStoreError` (a ConfigError) naming the bucket,
the key and what to check; every message we build goes through `redact`, so it never carries
a credential. Credentials come only from the standard AWS chain (environment, ~/.aws files,
profiles, instance roles); nothing here stores or logs them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import threading
import time
import uuid
import weakref
from base64 import b64encode
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Literal
from urllib.parse import quote

import boto3
import botocore.exceptions as bce
import urllib3.exceptions
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from pydantic import Field, field_validator, model_validator
from s3transfer.utils import ChunksizeAdjuster

from quadflow.section import Section

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
# S3 multipart limits (AWS S3 user guide, "Amazon S3 multipart upload limits"):
# parts are 5 MiB to 5 GiB (the last may be smaller), at most 10,000 per upload.
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB

_log = logging.getLogger("quadflow.objectstore")
SCHEME = "s3://"
_GLOB_CHARS = "*?["
# Environment variables whose values are credentials (boto3 credentials guide, "Environment variables").
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_MIN_REDACT_LEN = 4  # shorter values would mangle ordinary words; real keys are 16+ characters
# Error codes S3 documents as retryable ("Error responses": 500 InternalError, 503 SlowDown/ServiceUnavailable).
_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
    "RequestTimeout", "RequestTimeoutException", "RequestLimitExceeded", "TooManyRequestsException",
    "500", "502", "503", "504",
}
# Failures of a response body already under way; botocore does not retry these, we resume.
_STREAM_ERRORS = (
    bce.ResponseStreamingError, bce.ReadTimeoutError, bce.IncompleteReadError, bce.ConnectionClosedError,
    urllib3.exceptions.HTTPError, ConnectionError, TimeoutError,
)
# Request-level failures left over after botocore's retries: the endpoint is unreachable or flaky.
_CONNECT_ERRORS = (bce.EndpointConnectionError, bce.ConnectionError, bce.HTTPClientError)


class ObjectStoreSettings(Section):
    """Where the object store is and how hard to try; credentials are never part of it."""

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000; None: AWS S3 for the region."
    )
    region: str | None = Field(None, description="Region; None: from AWS_DEFAULT_REGION or the profile.")
    profile: str | None = Field(None, description="Named profile in ~/.aws/config; None: the default chain.")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="Bucket in the path or the host name; most S3-compatible stores want 'path'."
    )
    retry_mode: Literal["standard", "adaptive"] = Field(
        "standard", description="botocore retry mode; 'adaptive' also rate-limits the client when throttled."
    )
    max_attempts: int = Field(
        8, ge=1, le=50, description="Attempts per request (first included), and per stalled read without progress."
    )
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to open a connection.")
    read_timeout: float = Field(60.0, gt=0, description="Seconds without a byte from the server before retrying.")
    backoff_base: float = Field(0.2, gt=0, description="Seconds; full-jitter backoff base for resumed reads.")
    backoff_cap: float = Field(20.0, gt=0, description="Seconds; upper bound of one resume backoff.")
    multipart_threshold: int = Field(
        64 * MiB, ge=MIN_PART_SIZE, description="Bytes; files at least this big are uploaded in parts."
    )
    multipart_chunksize: int = Field(
        16 * MiB, ge=MIN_PART_SIZE, le=MAX_PART_SIZE, description="Bytes per uploaded part."
    )
    max_concurrency: int = Field(4, ge=1, le=64, description="Threads uploading parts of one file.")
    read_buffer: int = Field(1 * MiB, ge=4 * KiB, description="Bytes buffered by a streaming read.")
    verify_etag: bool = Field(
        True, description="Check each upload's ETag against the local MD5s; off for stores whose ETags differ."
    )
    checksums: Literal["when_required", "when_supported"] = Field(
        "when_required",
        description="botocore flexible checksums. 'when_supported' adds CRC32 headers that some "
        "S3-compatible stores reject; uploads are verified against their ETag either way.",
    )

    @model_validator(mode="before")
    @classmethod
    def _hide_userinfo(cls, data: Any) -> Any:
        """Blank a user:password@ in the endpoint before validation, so no error message quotes it."""
        url = data.get("endpoint_url") if isinstance(data, dict) else None
        if isinstance(url, str) and (m := re.match(r"^(https?://)([^/\s]*)@", url)):
            data = {**data, "endpoint_url": f"{m.group(1)}[redacted]@{url[m.end():]}"}
        return data

    @field_validator("endpoint_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"endpoint_url {v!r} must look like http(s)://host[:port]")
        if v is not None and "@" in v.split("://", 1)[1].split("/", 1)[0]:
            # the URL is recorded in manifests and logs; never quote it back, it may hold a password
            raise ValueError("endpoint_url must not carry user:password@; credentials come from the "
                             "AWS chain (environment, ~/.aws files, profiles)")
        return v


# Imported here, after ObjectStoreSettings: quadflow.settings imports ObjectStoreSettings for its
# `objectstore` section, so either module may be imported first.
from quadflow.settings import ConfigError  # noqa: E402


class ObjectStoreError(ConfigError):
    """A permanent object-store failure (missing bucket/key, denied, bad credentials): fix and rerun."""

    def __init__(self, message: str, *, code: str = "", bucket: str = "", key: str = ""):
        super().__init__(redact(message))  # whoever builds the message, no credential gets out
        self.code, self.bucket, self.key = code, bucket, key


class ObjectStoreIOError(OSError):
    """A transient object-store failure (5xx, throttling, resets, timeouts) that outlived every retry."""

    def __init__(self, message: str):
        super().__init__(redact(message))


@dataclass(frozen=True)
class ObjectInfo:
    """One object as listed or looked up; `etag` without quotes, `size` in bytes."""

    url: str
    bucket: str
    key: str
    size: int
    etag: str
    version_id: str | None
    last_modified: datetime | None  # None where the store did not say (put_bytes)


class RetryCounters:
    """Thread-safe counts of API calls, HTTP attempts and resumed reads on one client."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0  # API calls made (one per boto3 method call)
        self.attempts = 0  # HTTP requests sent, retries included
        self.stream_resumes = 0  # broken bodies resumed with a Range request

    def _add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    @property
    def request_retries(self) -> int:
        """Requests botocore sent again after a transient failure."""
        return max(0, self.attempts - self.calls)

    @property
    def retries(self) -> int:
        return self.request_retries + self.stream_resumes

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"calls": self.calls, "attempts": self.attempts, "request_retries": self.request_retries,
                    "stream_resumes": self.stream_resumes, "retries": self.retries}


@dataclass
class ObjectStoreClient:
    """A boto3 S3 client with its settings, session (for error hints) and retry counters."""

    s3: Any  # botocore.client.S3
    settings: ObjectStoreSettings
    session: boto3.session.Session
    counters: RetryCounters = field(default_factory=RetryCounters)
    rng: random.Random = field(default_factory=random.Random)

    @property
    def endpoint(self) -> str:
        """Where requests go, as messages name it: the endpoint URL, or AWS S3 and the region."""
        return configured_endpoint(self) or f"AWS S3 ({self.s3.meta.region_name or 'default region'})"


def configured_endpoint(c: ObjectStoreClient) -> str | None:
    """The S3-compatible endpoint this client talks to, or None for AWS S3 itself.

    objectstore.endpoint_url, else what boto3 took from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or the
    profile's `endpoint_url`: without this, errors said "at AWS S3" and manifests recorded no endpoint
    for a run pointed at MinIO by the environment.
    """
    if c.settings.endpoint_url:
        return c.settings.endpoint_url
    url = c.s3.meta.endpoint_url or ""
    if m := re.match(r"^(https?://)([^/\s]*)@", url):  # never quote a user:password@ back
        url = f"{m.group(1)}[redacted]@{url[m.end():]}"
    host = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1].rsplit(":", 1)[0].lower()
    return None if not url or host.endswith((".amazonaws.com", ".amazonaws.com.cn")) else url


def endpoint_of(settings: ObjectStoreSettings | None) -> str | None:
    """configured_endpoint for these settings and this environment (a client is built; nothing is sent)."""
    return configured_endpoint(client(settings))


_SESSIONS: weakref.WeakSet[boto3.session.Session] = weakref.WeakSet()  # for redact()


def client(settings: ObjectStoreSettings | None = None, *, seed: int | None = None) -> ObjectStoreClient:
    """A client on the standard AWS credential chain, with botocore retries and counters wired in."""
    settings = settings or ObjectStoreSettings()
    try:
        session = boto3.session.Session(profile_name=settings.profile, region_name=settings.region)
    except bce.ProfileNotFound:
        raise ObjectStoreError(
            f"AWS profile {settings.profile!r} is not defined: check ~/.aws/config and ~/.aws/credentials "
            f"(or AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE), or leave objectstore.profile unset",
            code="ProfileNotFound",
        ) from None
    _SESSIONS.add(session)
    config = Config(
        retries={"mode": settings.retry_mode, "total_max_attempts": settings.max_attempts},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_pool_connections=max(10, settings.max_concurrency + 2),
        s3={"addressing_style": settings.addressing_style},
        request_checksum_calculation=settings.checksums,
        response_checksum_validation=settings.checksums,
    )
    s3 = session.client("s3", endpoint_url=settings.endpoint_url, config=config)
    out = ObjectStoreClient(s3=s3, settings=settings, session=session, rng=random.Random(seed))
    counters = out.counters
    # before-call fires once per API call, before-send once per HTTP attempt (retries included).
    s3.meta.events.register("before-call.s3", lambda **_: counters._add("calls"))
    s3.meta.events.register("before-send.s3", lambda **_: counters._add("attempts"))
    return out


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015)."""
    return rng.uniform(0.0, min(cap, base * 2.0 ** max(0, attempt - 1)))


# ---------------------------------------------------------------------------------------------
# Credentials never leave: redaction and error messages
# ---------------------------------------------------------------------------------------------


def _credential_values(sessions: tuple[boto3.session.Session, ...]) -> set[str]:
    values = {os.environ.get(name) or "" for name in _CREDENTIAL_ENV}
    for session in (*sessions, *list(_SESSIONS)):
        try:
            creds = session.get_credentials()
            frozen = creds.get_frozen_credentials() if creds is not None else None
        except Exception:  # a broken credential source must not hide the error being reported
            continue
        if frozen is not None:
            values.update(v or "" for v in (frozen.access_key, frozen.secret_key, frozen.token))
    return {v for v in values if len(v) >= _MIN_REDACT_LEN}


def redact(text: str, *sessions: boto3.session.Session) -> str:
    """`text` without any credential value from the environment or a boto session (raw or URL-encoded)."""
    for value in sorted(_credential_values(sessions), key=len, reverse=True):
        for form in {value, quote(value, safe=""), quote(value, safe="/")}:
            text = text.replace(form, "[redacted]")
    return text


def _credential_source(c: ObjectStoreClient) -> str:
    try:
        creds = c.session.get_credentials()
    except Exception:
        return "an AWS credential source that failed to load"
    if creds is None:
        return "nowhere (no credentials found)"
    method = getattr(creds, "method", "") or "unknown"
    where = {
        "env": "the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
        "shared-credentials-file": "the shared credentials file (~/.aws/credentials)",
        "config-file": "the AWS config file (~/.aws/config)",
        "assume-role": "an assumed role from the AWS config",
        "iam-role": "the instance's IAM role",
        "container-role": "the container's IAM role",
        "sso": "AWS SSO",
    }.get(method, f"credential provider {method!r}")
    profile = c.session.profile_name
    return f"{where}, profile {profile!r}" if profile and profile != "default" else where


def _describe(bucket: str, key: str) -> str:
    return f"{SCHEME}{bucket}/{key}" if key else f"bucket {bucket!r}"


def _error(c: ObjectStoreClient, err: Exception, bucket: str, key: str, action: str) -> Exception:
    """The exception to raise for a boto failure: ObjectStoreError (permanent) or ObjectStoreIOError."""
    what = _describe(bucket, key)
    if isinstance(err, bce.ClientError):
        info = err.response.get("Error", {}) or {}
        code = str(info.get("Code") or err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        detail = str(info.get("Message") or "").strip()
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _TRANSIENT_CODES or status >= 500:
            msg = (f"{action} {what} failed at {c.endpoint} after retrying (up to {c.settings.max_attempts} attempts): "
                   f"{code} {detail}".strip() + "; the store is overloaded or failing, retry later")
            return ObjectStoreIOError(msg)
        msg = _permanent_message(c, code, detail, bucket, key, action)
        return ObjectStoreError(msg, code=code, bucket=bucket, key=key)
    if isinstance(err, (bce.NoCredentialsError, bce.PartialCredentialsError)):
        msg = (f"{action} {what}: no usable AWS credentials found ({type(err).__name__}); set "
               f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or ~/.aws/credentials")
        return ObjectStoreError(msg, code="NoCredentials", bucket=bucket, key=key)
    if isinstance(err, bce.CredentialRetrievalError):
        msg = f"{action} {what}: the AWS credential provider failed: {err}"
        return ObjectStoreError(msg, code="CredentialRetrieval", bucket=bucket, key=key)
    if isinstance(err, (*_CONNECT_ERRORS, *_STREAM_ERRORS)):
        msg = (f"{action} {what}: cannot get an answer from {c.endpoint} after retrying (up to "
               f"{c.settings.max_attempts} attempts; {type(err).__name__}: {err}); check the endpoint URL "
               f"and the network")
        return ObjectStoreIOError(msg)
    msg = f"{action} {what} failed: {type(err).__name__}: {err}"
    return ObjectStoreError(msg, code=type(err).__name__, bucket=bucket, key=key)


def _permanent_message(c: ObjectStoreClient, code: str, detail: str, bucket: str, key: str, action: str) -> str:
    what = _describe(bucket, key)
    source = _credential_source(c)
    region = c.s3.meta.region_name
    if code == "NoSuchBucket":
        return (f"bucket {bucket!r} does not exist at {c.endpoint}: check the bucket name in the URL, "
                f"the endpoint URL and the region ({region})")
    if code in ("NoSuchKey", "404", "NotFound"):
        return f"{what} does not exist at {c.endpoint}: check the key (keys are case-sensitive) and bucket"
    if code in ("AccessDenied", "403", "AllAccessDisabled", "Forbidden"):
        return (f"access denied: {action} {what} at {c.endpoint} with credentials from {source}; check that "
                f"these credentials may {action} in bucket {bucket!r} (IAM and bucket policy), the profile "
                f"and the endpoint URL")
    if code == "InvalidAccessKeyId":
        return (f"the access key from {source} is not known to {c.endpoint} ({action} {what}): check the "
                f"credentials source and that the endpoint URL is the store these credentials belong to")
    if code == "SignatureDoesNotMatch":
        return (f"the secret key from {source} does not match its access key at {c.endpoint} "
                f"({action} {what}): check the credentials, the endpoint URL and the region ({region})")
    if code in ("InvalidToken", "ExpiredToken", "TokenRefreshRequired"):
        return (f"the session token from {source} is invalid or expired ({action} {what}): refresh the "
                f"credentials (AWS_SESSION_TOKEN, aws sso login) and rerun")
    if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "301"):
        return (f"bucket {bucket!r} is not in region {region} ({code}: {detail}): set objectstore.region "
                f"to the bucket's region or check the endpoint URL")
    if code == "InvalidBucketName":
        return f"{bucket!r} is not a valid bucket name ({detail}): check the s3:// URL"
    if code in ("PreconditionFailed", "412"):
        return f"{what} changed while it was being read (its ETag moved): rerun to read the new version"
    return f"{action} {what} failed at {c.endpoint}: {code}: {detail}"


def _call(c: ObjectStoreClient, op: str, action: str, bucket: str, key: str, **params: Any) -> Any:
    """`c.s3.<op>(**params)` with a failure translated into our two error classes (naming bucket/key)."""
    try:
        return getattr(c.s3, op)(**params)
    except (bce.ClientError, bce.BotoCoreError) as err:
        raise _error(c, err, bucket, key, action) from None


# ---------------------------------------------------------------------------------------------
# URLs, listing and globs
# ---------------------------------------------------------------------------------------------


def is_s3(path: str | os.PathLike[str]) -> bool:
    return isinstance(path, str) and path[:5].lower() == SCHEME


def parse(url: str) -> tuple[str, str]:
    """s3://bucket/some/key -> ("bucket", "some/key"); the key may be empty (bucket root)."""
    if not is_s3(url):
        raise ObjectStoreError(f"{url!r} is not an s3:// URL", code="BadURL")
    bucket, _, key = url[len(SCHEME):].partition("/")
    if not bucket or any(ch.isspace() for ch in bucket):
        raise ObjectStoreError(f"{url!r} has no valid bucket name: write s3://bucket/key", code="BadURL")
    return bucket, key


def join(bucket: str, key: str) -> str:
    return f"{SCHEME}{bucket}/{key}"


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """A key glob as a regex: `*` and `?` stay within one path segment, `**` crosses segments."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif ch == "*":
            out.append("[^/]*")
            i += 1
        elif ch == "?":
            out.append("[^/]")
            i += 1
        elif ch == "[" and (end := pattern.find("]", i + 3 if pattern.startswith("[!", i) else i + 2)) != -1:
            body = pattern[i + 1:end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(ch))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def literal_prefix(key_pattern: str) -> str:
    """The part of a key glob before its first wildcard: the prefix worth listing."""
    cut = min((i for i in (key_pattern.find(ch) for ch in _GLOB_CHARS) if i != -1), default=len(key_pattern))
    return key_pattern[:cut]


def _info_from_listing(bucket: str, item: dict[str, Any]) -> ObjectInfo:
    return ObjectInfo(url=join(bucket, item["Key"]), bucket=bucket, key=item["Key"], size=int(item["Size"]),
                      etag=str(item.get("ETag", "")).strip('"'), version_id=None,
                      last_modified=item.get("LastModified"))


def list_prefix(c: ObjectStoreClient, bucket: str, prefix: str, *, page_size: int = 1000) -> list[ObjectInfo]:
    """Every object under `prefix` (recursively), following list_objects_v2 continuation tokens."""
    out: list[ObjectInfo] = []
    token: str | None = None
    while True:
        params: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
        if token:
            params["ContinuationToken"] = token
        page = _call(c, "list_objects_v2", "list", bucket, prefix, **params)
        out.extend(_info_from_listing(bucket, item) for item in page.get("Contents", []))
        if not page.get("IsTruncated"):
            return out
        token = page.get("NextContinuationToken")
        if not token:  # a truncated page without a token would loop forever
            raise ObjectStoreIOError(f"listing {join(bucket, prefix)} returned a truncated page with no token")


def head(c: ObjectStoreClient, url: str) -> ObjectInfo:
    """Size, ETag and version of one object; ObjectStoreError if it does not exist."""
    bucket, key = parse(url)
    try:
        resp = c.s3.head_object(Bucket=bucket, Key=key)
    except bce.ClientError as err:
        raise _missing_or(c, err, bucket, key, "read") from None
    except bce.BotoCoreError as err:
        raise _error(c, err, bucket, key, "read") from None
    return ObjectInfo(url=join(bucket, key), bucket=bucket, key=key, size=int(resp["ContentLength"]),
                      etag=str(resp.get("ETag", "")).strip('"'), version_id=resp.get("VersionId"),
                      last_modified=resp.get("LastModified"))


def _missing_or(c: ObjectStoreClient, err: bce.ClientError, bucket: str, key: str, action: str) -> Exception:
    """A HEAD 404 carries no body: tell a missing bucket from a missing key with one more request."""
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if status == 404 and not _bucket_exists(c, bucket):
        msg = _permanent_message(c, "NoSuchBucket", "", bucket, key, action)
        return ObjectStoreError(msg, code="NoSuchBucket", bucket=bucket, key=key)
    if status == 404:
        msg = _permanent_message(c, "NoSuchKey", "", bucket, key, action)
        return ObjectStoreError(msg, code="NoSuchKey", bucket=bucket, key=key)
    return _error(c, err, bucket, key, action)


def _bucket_exists(c: ObjectStoreClient, bucket: str) -> bool:
    try:
        c.s3.head_bucket(Bucket=bucket)
    except bce.ClientError as err:
        if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        raise _error(c, err, bucket, "", "read") from None
    except bce.BotoCoreError as err:
        raise _error(c, err, bucket, "", "read") from None
    return True


def exists(c: ObjectStoreClient, url: str) -> bool:
    """Whether the object exists; a missing bucket or a denied request raises ObjectStoreError."""
    try:
        head(c, url)
    except ObjectStoreError as e:
        if e.code == "NoSuchKey":
            return False
        raise
    return True


def expand(c: ObjectStoreClient, pattern: str, *, page_size: int = 1000) -> list[ObjectInfo]:
    """Objects an s3:// input names, sorted by key.

    `s3://b/prefix/` (or `s3://b`): everything under the prefix; `s3://b/key`: that object (or,
    if absent, everything under `key/`); a glob (`*`, `?`, `[..]` within a segment, `**` across
    segments): the matching keys, listed from the glob's longest literal prefix. Folder markers
    (keys ending in '/') are skipped. A missing literal key raises ObjectStoreError; a prefix or
    glob that matches nothing returns [].
    """
    bucket, key = parse(pattern)
    if any(ch in key for ch in _GLOB_CHARS):
        regex = glob_to_regex(key)
        found = [o for o in list_prefix(c, bucket, literal_prefix(key), page_size=page_size)
                 if regex.match(o.key)]
    elif key == "" or key.endswith("/"):
        found = list_prefix(c, bucket, key, page_size=page_size)
    else:
        try:
            return [head(c, pattern)]
        except ObjectStoreError as e:
            if e.code != "NoSuchKey":
                raise
            found = list_prefix(c, bucket, key + "/", page_size=page_size)
            if not [o for o in found if not o.key.endswith("/")]:
                raise
    return sorted((o for o in found if not o.key.endswith("/")), key=lambda o: o.key)


# ---------------------------------------------------------------------------------------------
# Streaming reads
# ---------------------------------------------------------------------------------------------


class S3ObjectReader(io.RawIOBase):
    """A seekable binary stream over one object that resumes broken bodies with Range requests.

    The first GET happens at construction (so a missing object fails at open, like a local
    file); later GETs are pinned to that ETag (If-Match), so a resumed read never stitches two
    versions together. Given `etag` (from a listing), the first GET is pinned too: an object
    replaced since it was listed fails with PreconditionFailed instead of being read as if it
    were the listed one. Memory is bounded by the caller's read size.
    """

    def __init__(self, c: ObjectStoreClient, url: str, etag: str | None = None, version_id: str | None = None):
        super().__init__()
        self._c = c
        self.url = url
        self.bucket, self.key = parse(url)
        self.size = 0  # bytes, from the first response
        self.etag: str | None = None  # quoted, as S3 returns it
        self.version_id: str | None = version_id
        self._expect = None if etag is None else f'"{etag.strip(chr(34))}"'
        self.resumes = 0  # broken bodies resumed on this stream
        self._pos = 0
        self._body: Any = None  # botocore StreamingBody positioned at self._pos, or None
        self._open_at(0)

    def _open_at(self, start: int) -> None:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if self.etag is not None or self._expect is not None:
            params["IfMatch"] = self.etag or self._expect
        if self.version_id is not None:
            params["VersionId"] = self.version_id
        if start > 0:
            params["Range"] = f"bytes={start}-"
        resp = _call(self._c, "get_object", "read", self.bucket, self.key, **params)
        length = int(resp["ContentLength"])
        if self.etag is None:
            self.size, self.etag = length, resp.get("ETag")
            self.version_id = resp.get("VersionId") or self.version_id
        elif start > 0 and (length != self.size - start
                            or not str(resp.get("ContentRange", "")).endswith(f"/{self.size}")):
            resp["Body"].close()
            raise ObjectStoreIOError(
                f"{self.url}: ranged read from byte {start} returned {length} bytes "
                f"({resp.get('ContentRange')!r}); expected {self.size - start} of {self.size}"
            )
        self._body = resp["Body"]

    def _drop_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # closing a broken connection may fail again; it is gone either way
                pass
            self._body = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        pos = base + offset
        if pos < 0:
            raise ValueError(f"negative seek position {pos} in {self.url}")
        if pos != self._pos:
            self._drop_body()  # reopened lazily with a Range request on the next read
            self._pos = pos
        return pos

    def readinto(self, buf: Any) -> int:
        if self.closed:
            raise ValueError(f"read from closed stream {self.url}")
        view = memoryview(buf).cast("B")
        want = min(len(view), self.size - self._pos)
        if want <= 0:
            return 0
        failures = 0  # consecutive failures without progress
        while True:
            try:
                if self._body is None:
                    self._open_at(self._pos)
                n = self._body.readinto(view[:want])
                if n == 0:
                    raise bce.IncompleteReadError(actual_bytes=self._pos, expected_bytes=self.size)
            except _STREAM_ERRORS as err:
                self._drop_body()
                failures += 1
                if failures >= self._c.settings.max_attempts:
                    raise _error(self._c, err, self.bucket, self.key, "read") from None
                self.resumes += 1
                self._c.counters._add("stream_resumes")
                _log.info("resuming %s at byte %d of %d after %s (try %d)", self.url, self._pos, self.size,
                          type(err).__name__, failures + 1)
                s = self._c.settings
                time.sleep(backoff_delay(failures, s.backoff_base, s.backoff_cap, self._c.rng))
                continue
            self._pos += n
            return n

    def close(self) -> None:
        self._drop_body()
        super().close()


def open_read(c: ObjectStoreClient, url: str, *, etag: str | None = None,
              version_id: str | None = None) -> io.BufferedReader:
    """A buffered binary reader over an object: wrap it in gzip/zstandard/TextIOWrapper like a file.

    `etag` (quoted or not) pins the read to the content that was listed; `version_id` reads that
    version of a versioned bucket.
    """
    return io.BufferedReader(S3ObjectReader(c, url, etag=etag, version_id=version_id),
                             buffer_size=c.settings.read_buffer)


def read_bytes(c: ObjectStoreClient, url: str, max_bytes: int = 64 * MiB) -> bytes:
    """A whole small object (a manifest, a config); refuses objects over max_bytes."""
    with open_read(c, url) as f:
        size = f.raw.size
        if size > max_bytes:
            raise ObjectStoreError(
                f"{url} is {size:,} bytes, over read_bytes' limit of {max_bytes:,}: stream it with open_read",
                code="TooLarge", bucket=f.raw.bucket, key=f.raw.key)
        return f.read()


# ---------------------------------------------------------------------------------------------
# Writes and atomic publishing
# ---------------------------------------------------------------------------------------------


def put_bytes(c: ObjectStoreClient, data: bytes, url: str, content_type: str | None = None) -> ObjectInfo:
    """Write a small object in one PUT; the store checks it against our Content-MD5."""
    bucket, key = parse(url)
    if not key or key.endswith("/"):
        raise ObjectStoreError(f"{url!r} names no object key to write", code="BadURL", bucket=bucket)
    md5 = hashlib.md5(data)
    extra = {"ContentType": content_type} if content_type else {}
    resp = _call(c, "put_object", "write", bucket, key, Bucket=bucket, Key=key, Body=data,
                 ContentMD5=b64encode(md5.digest()).decode("ascii"), **extra)
    return ObjectInfo(url=join(bucket, key), bucket=bucket, key=key, size=len(data),
                      etag=str(resp.get("ETag", "")).strip('"'), version_id=resp.get("VersionId"),
                      last_modified=None)


def expected_etag(path: str | Path, multipart_threshold: int, multipart_chunksize: int) -> str:
    """The ETag S3 gives an unencrypted/SSE-S3 upload: MD5, or MD5 of part MD5s + '-parts'."""
    size = os.path.getsize(path)
    if size < multipart_threshold:
        h = hashlib.md5()
        with open(path, "rb") as f:
            while chunk := f.read(4 * MiB):
                h.update(chunk)
        return h.hexdigest()
    part = ChunksizeAdjuster().adjust_chunksize(multipart_chunksize, size)
    digests = []
    with open(path, "rb") as f:
        while True:
            h, left = hashlib.md5(), part
            while left and (chunk := f.read(min(left, 4 * MiB))):
                h.update(chunk)
                left -= len(chunk)
            if left == part:
                break
            digests.append(h.digest())
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def _transfer_config(c: ObjectStoreClient) -> TransferConfig:
    """Part size, threshold and concurrency of managed uploads and copies (one part layout, so one ETag)."""
    s = c.settings
    return TransferConfig(multipart_threshold=s.multipart_threshold, multipart_chunksize=s.multipart_chunksize,
                          max_concurrency=s.max_concurrency, use_threads=s.max_concurrency > 1)


def upload_file(c: ObjectStoreClient, local_path: str | Path, url: str) -> ObjectInfo:
    """Upload a file (in parts above the threshold, aborted on failure), then verify size and ETag."""
    bucket, key = parse(url)
    path = Path(local_path)
    if not key or key.endswith("/"):
        raise ObjectStoreError(f"{url!r} names no object key to write {path} to", code="BadURL", bucket=bucket)
    config = _transfer_config(c)
    size = path.stat().st_size  # FileNotFoundError names the path
    try:
        c.s3.upload_file(str(path), bucket, key, Config=config)
    except S3UploadFailedError as err:
        cause = err.__cause__ or err.__context__  # boto3 raises it inside `except ClientError`
        boto_err = cause if isinstance(cause, (bce.ClientError, bce.BotoCoreError)) else err
        raise _error(c, boto_err, bucket, key, "write") from None
    except (bce.ClientError, bce.BotoCoreError) as err:
        raise _error(c, err, bucket, key, "write") from None
    return _verify_upload(c, path, size, bucket, key)


def _verify_upload(c: ObjectStoreClient, path: Path, size: int, bucket: str, key: str) -> ObjectInfo:
    try:
        resp = c.s3.head_object(Bucket=bucket, Key=key)
    except (bce.ClientError, bce.BotoCoreError) as err:
        raise _error(c, err, bucket, key, "verify") from None
    info = ObjectInfo(url=join(bucket, key), bucket=bucket, key=key, size=int(resp["ContentLength"]),
                      etag=str(resp.get("ETag", "")).strip('"'), version_id=resp.get("VersionId"),
                      last_modified=resp.get("LastModified"))
    if info.size != size:
        raise ObjectStoreIOError(f"{info.url} holds {info.size:,} bytes after uploading {path} ({size:,} bytes)")
    # SSE-KMS objects have ETags that are not MD5s (S3 API reference, "Common response headers").
    md5_like = re.fullmatch(r"[0-9a-f]{32}(-\d+)?", info.etag) is not None
    kms = str(resp.get("ServerSideEncryption", "")).startswith("aws:kms")
    if c.settings.verify_etag and md5_like and not kms:
        want = expected_etag(path, c.settings.multipart_threshold, c.settings.multipart_chunksize)
        if info.etag != want:
            raise ObjectStoreIOError(f"{info.url} has ETag {info.etag} after uploading {path}; expected {want}")
    return info


def delete(c: ObjectStoreClient, url: str) -> None:
    """Remove one object; removing a missing key is not an error (S3 semantics)."""
    bucket, key = parse(url)
    if not key:
        raise ObjectStoreError(f"{url!r} names no object key to delete", code="BadURL", bucket=bucket)
    _call(c, "delete_object", "delete", bucket, key, Bucket=bucket, Key=key)


@dataclass(frozen=True)
class PublishResult:
    """What publish_prefix wrote: the data objects, then the manifest; `stale` were there before."""

    prefix: str
    objects: tuple[ObjectInfo, ...]
    manifest: ObjectInfo
    replaced: bool  # an older manifest was there (and was swapped out once the new files were staged)
    stale: tuple[str, ...]  # objects under the prefix this publish did not write (deleted if asked)


def _prefix_key(url_prefix: str) -> tuple[str, str]:
    bucket, key = parse(url_prefix)
    return bucket, (key if key == "" or key.endswith("/") else key + "/")


def _load_manifest(manifest_path: Path) -> None:
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{manifest_path} is not valid JSON ({e}); refusing to publish it") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path} holds a {type(manifest).__name__}, not a JSON object")


STAGING = ".quadflow-staging/"  # under an output prefix: a republish's files before the swap


def publish_prefix(c: ObjectStoreClient, local_dir: str | Path, url_prefix: str,
                   manifest_name: str = "manifest.json", *, delete_stale: bool = False,
                   before_manifest: Callable[[tuple[ObjectInfo, ...]], None] | None = None) -> PublishResult:
    """Publish a local output directory under an s3:// prefix so readers never see half of it.

    Readers trust a prefix only through its manifest. A first publish (no manifest there)
    uploads every file to its place, verifies it (size, ETag) and puts the manifest (the local
    file, byte for byte) last. A republish writes aside, swaps last: every file is uploaded and
    verified under `<prefix>.quadflow-staging/<id>/` while the previous manifest and files stay
    as they were, so a failed upload (access denied, a lost connection, a killed process) leaves
    the previous output published and verifiable. Only then is the old manifest deleted, the
    staged objects copied into place server-side (the same part sizes, so the same ETags) and
    verified, the manifest put, and the staged copies deleted. A failure during the swap leaves
    no manifest, never one that describes other files. Staged copies a killed publish left are
    deleted by the next publish. Objects under the prefix that this publish did not write are
    reported in `stale`, and deleted after the manifest only when `delete_stale` (they may
    belong to someone else). `before_manifest` is called with the data objects in place just
    before the manifest goes up, and may rewrite the local manifest (e.g. to record what the
    upload cost).
    """
    root = Path(local_dir)
    manifest_path = root / manifest_name
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} does not exist: write the manifest before publishing {root}")
    _load_manifest(manifest_path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p != manifest_path)
    bucket, prefix = _prefix_key(url_prefix)
    manifest_url = join(bucket, prefix + manifest_name)
    for left in list_prefix(c, bucket, prefix + STAGING):  # a killed republish's staged copies
        delete(c, left.url)

    def final(p: Path) -> str:
        return join(bucket, prefix + p.relative_to(root).as_posix())

    replaced = exists(c, manifest_url)
    if not replaced:
        objects = tuple(upload_file(c, p, final(p)) for p in files)
    else:
        staging = prefix + STAGING + uuid.uuid4().hex + "/"
        staged = [upload_file(c, p, join(bucket, staging + p.relative_to(root).as_posix())) for p in files]
        delete(c, manifest_url)  # the swap: from here until the new manifest, nothing is published
        objects = tuple(_copy_into_place(c, p, info, final(p)) for p, info in zip(files, staged))
        for info in staged:
            delete(c, info.url)
    if before_manifest is not None:
        before_manifest(objects)
        _load_manifest(manifest_path)
    manifest_info = upload_file(c, manifest_path, manifest_url)

    written = {o.key for o in objects} | {manifest_info.key}
    stale = tuple(o.url for o in list_prefix(c, bucket, prefix) if o.key not in written)
    if delete_stale:
        for url in stale:
            delete(c, url)
    return PublishResult(prefix=join(bucket, prefix), objects=objects, manifest=manifest_info,
                         replaced=replaced, stale=stale)


def _copy_into_place(c: ObjectStoreClient, path: Path, staged: ObjectInfo, url: str) -> ObjectInfo:
    """Server-side copy of a staged upload to its final key, verified against the local file."""
    bucket, key = parse(url)
    config = _transfer_config(c)
    try:
        c.s3.copy({"Bucket": staged.bucket, "Key": staged.key}, bucket, key, Config=config)
    except (bce.ClientError, bce.BotoCoreError) as err:
        raise _error(c, err, bucket, key, "write") from None
    return _verify_upload(c, path, staged.size, bucket, key)


def read_manifest(c: ObjectStoreClient, url_prefix: str, manifest_name: str = "manifest.json") -> dict | None:
    """The published manifest under a prefix, or None when nothing (complete) is published there."""
    bucket, prefix = _prefix_key(url_prefix)
    url = join(bucket, prefix + manifest_name)
    try:
        data = read_bytes(c, url)
    except ObjectStoreError as e:
        if e.code in ("NoSuchKey", "404"):
            return None
        raise
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ObjectStoreError(f"{url} is not valid JSON ({e})", code="BadManifest", bucket=bucket,
                               key=prefix + manifest_name) from None
    if not isinstance(manifest, dict):
        raise ObjectStoreError(f"{url} holds a {type(manifest).__name__}, not a JSON object",
                               code="BadManifest", bucket=bucket, key=prefix + manifest_name)
    return manifest


def prefix_url(url: str) -> str:
    """An s3:// output prefix in one spelling: `s3://bucket/some/prefix/` (trailing slash)."""
    bucket, prefix = _prefix_key(url)
    return join(bucket, prefix)


def check_access(c: ObjectStoreClient, url: str) -> None:
    """Fail fast, before a long run, when the bucket of `url` is missing or may not be listed.

    One LIST of at most one key under the URL's prefix: it needs only s3:ListBucket, which
    reading prefixes and publishing outputs need anyway.
    """
    bucket, key = parse(url)
    _call(c, "list_objects_v2", "list", bucket, key, Bucket=bucket, Prefix=key, MaxKeys=1)


def abort_incomplete_uploads(c: ObjectStoreClient, url_prefix: str) -> int:
    """Abort multipart uploads left under a prefix by a killed publish; returns how many.

    Their parts are invisible to readers but are stored (and billed) until aborted. Only our own
    output prefix is ever passed here.
    """
    bucket, prefix = _prefix_key(url_prefix)
    page = _call(c, "list_multipart_uploads", "list", bucket, prefix, Bucket=bucket, Prefix=prefix)
    uploads = page.get("Uploads", []) or []
    for up in uploads:
        _call(c, "abort_multipart_upload", "write", bucket, up["Key"], Bucket=bucket, Key=up["Key"],
              UploadId=up["UploadId"])
    return len(uploads)

