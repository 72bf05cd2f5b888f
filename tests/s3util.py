"""A real S3 endpoint for tests: moto's server on loopback, and a fault-injecting proxy in front.

Nothing here mocks boto3: tests talk HTTP to moto. `FaultProxy` forwards requests to moto and,
by a seeded schedule, answers a fraction of them with 500 / 503 SlowDown, resets the
connection, or stalls longer than the client's read timeout (before the response, or halfway
through a GET body), counting what it did and logging every request in order.
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import struct
import threading
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

import pytest

__all__ = [
    "FaultProxy", "ProxiedRequest", "s3_env", "s3_server", "s3_settings", "s3_bucket", "s3_proxy",
    "s3_admin", "moto_auth", "TEST_ACCESS_KEY", "TEST_SECRET_KEY", "loopback_settings", "apply_test_env",
]

TEST_ACCESS_KEY = "AKIAQFTESTKEY0000001"
TEST_SECRET_KEY = "qfSecret/+Test0123456789abcdefghijklmnopq"  # '/' and '+' exercise URL-encoded redaction
TEST_REGION = "us-east-1"
FAULTS = ("500", "503", "reset", "stall", "reset_mid", "stall_mid")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
               "upgrade", "expect"}
_ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
              "<RequestId>{rid}</RequestId><HostId>quadflow-test-proxy</HostId></Error>")


def loopback_settings(endpoint: str, **overrides):
    """ObjectStoreSettings for a loopback endpoint with short timeouts and fast backoff."""
    from quadflow.objectstore import ObjectStoreSettings

    base = dict(endpoint_url=endpoint, region=TEST_REGION, addressing_style="path", max_attempts=8,
                connect_timeout=2.0, read_timeout=2.0, backoff_base=0.02, backoff_cap=0.2)
    return ObjectStoreSettings(**{**base, **overrides})


@dataclass(frozen=True)
class ProxiedRequest:
    """One request the proxy saw, in arrival order, and what it did with it."""

    method: str
    path: str  # path and query, as sent
    outcome: str  # "ok", "error:<Code>" or a fault from FAULTS


class FaultProxy:
    """HTTP proxy on 127.0.0.1 in front of an S3 endpoint that injects faults on a seeded schedule.

    Faults other than `*_mid` happen before the request reaches the upstream, so a retried
    write is never applied twice. `*_mid` faults hit only GET responses with a body: the proxy
    sends the headers and part of the body, then resets or stalls.
    """

    def __init__(self, upstream: tuple[str, int], *, fault_rate: float = 0.0, faults: tuple[str, ...] = FAULTS,
                 seed: int = 0, stall_s: float = 3.0):
        self.upstream = upstream
        self.stall_s = stall_s  # seconds; must exceed the client's read timeout
        self.counts: Counter[str] = Counter()
        self.log: list[ProxiedRequest] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error_rule: tuple[Callable[[str, str], bool], int, str, str] | None = None
        self.configure(fault_rate=fault_rate, faults=faults, seed=seed)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def configure(self, *, fault_rate: float, faults: tuple[str, ...] = FAULTS, seed: int = 0) -> None:
        """Fault a `fault_rate` fraction of requests, drawing the kind from `faults` with `seed`."""
        unknown = set(faults) - set(FAULTS)
        if unknown or not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"bad fault schedule: rate {fault_rate!r}, unknown faults {sorted(unknown)}")
        with self._lock:
            self.fault_rate, self.faults, self._rng = fault_rate, tuple(faults), random.Random(seed)

    def respond_with_error(self, match: Callable[[str, str], bool] | None, status: int = 403,
                           code: str = "AccessDenied", message: str = "Access Denied") -> None:
        """Answer requests where match(method, path) with a real S3 error body (None: stop)."""
        with self._lock:
            self._error_rule = None if match is None else (match, status, code, message)

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes stalled handlers
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            rule = self._error_rule
            if rule is not None and rule[0](method, path):
                outcome = f"error:{rule[2]}"
            elif self.fault_rate and self._rng.random() < self.fault_rate:
                allowed = [f for f in self.faults if not f.endswith("_mid") or method == "GET"]
                outcome = self._rng.choice(allowed) if allowed else "ok"
            else:
                outcome = "ok"
            self.counts[outcome] += 1
            self.log.append(ProxiedRequest(method, path, outcome))
            return outcome

    def _cut_at(self, n: int) -> int:
        with self._lock:
            return self._rng.randrange(n) if n > 1 else 0

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like a real S3 endpoint

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
                pass

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except OSError:  # the client gave up on a stalled or reset connection
                    self.close_connection = True

            def _proxy(self) -> None:
                if not self.client_address[0].startswith("127."):  # loopback only
                    self.close_connection = True
                    return
                body = self._read_body()
                outcome = proxy._decide(self.command, self.path)
                if outcome == "reset":
                    return self._reset()
                if outcome == "stall":
                    proxy._stop.wait(proxy.stall_s)
                    self.close_connection = True
                    return
                if outcome in ("500", "503") or outcome.startswith("error:"):
                    return self._send_error(outcome)
                status, reason, headers, payload = self._forward(body)
                self.send_response_only(status, reason)
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                if self.command == "HEAD" or not payload:
                    return
                if outcome in ("reset_mid", "stall_mid"):
                    self.wfile.write(payload[:proxy._cut_at(len(payload))])
                    self.wfile.flush()
                    if outcome == "reset_mid":
                        return self._reset()
                    proxy._stop.wait(proxy.stall_s)
                    self.close_connection = True
                    return
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    parts = []
                    while True:  # de-chunk; the upstream gets a Content-Length instead
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                            conn.putheader(name, value)  # Host unchanged: SigV4 signed it
                    if body or self.command in ("PUT", "POST"):
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body or None)
                    resp = conn.getresponse()
                    payload = resp.read()
                    headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP
                               and k.lower() != "content-length"]
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(payload))
                    if length is not None:
                        headers.append(("Content-Length", length))
                    return resp.status, resp.reason, headers, payload
                finally:
                    conn.close()

            def _send_error(self, outcome: str) -> None:
                if outcome.startswith("error:"):
                    _, status, code, message = proxy._error_rule or (None, 403, "AccessDenied", "Access Denied")
                elif outcome == "503":
                    status, code, message = 503, "SlowDown", "Please reduce your request rate."
                else:
                    status, code, message = 500, "InternalError", "We encountered an internal error. Please try again."
                payload = b"" if self.command == "HEAD" else _ERROR_XML.format(
                    code=code, message=message, rid=uuid.uuid4().hex[:16]).encode()
                self.send_response_only(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _reset(self) -> None:
                """Close with RST (SO_LINGER 0), as a dropped connection looks to the client."""
                self.close_connection = True
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                except OSError:
                    pass

        return Handler


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port for the whole test session; yields its URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def apply_test_env(monkeypatch: pytest.MonkeyPatch, config_dir) -> dict[str, str]:
    """Put the test credentials in the environment (and hide the machine's own AWS setup); returns them."""
    env = {
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_DEFAULT_REGION": TEST_REGION,
        "AWS_CONFIG_FILE": str(config_dir / "config"),  # files that do not exist
        "AWS_SHARED_CREDENTIALS_FILE": str(config_dir / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Test credentials in the environment, and nothing from the machine's own AWS setup."""
    return apply_test_env(monkeypatch, tmp_path_factory.mktemp("aws-config"))


@pytest.fixture
def s3_settings(s3_server: str, s3_env: dict[str, str]):
    """Settings pointing straight at moto (no faults)."""
    return loopback_settings(s3_server)


@pytest.fixture
def s3_admin(s3_server: str, s3_env: dict[str, str]):
    """A plain boto3 client on moto, for test setup and checks outside the code under test."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=s3_server, region_name=TEST_REGION,
                        config=Config(s3={"addressing_style": "path"}))


@pytest.fixture
def s3_bucket(s3_admin) -> Iterator[str]:
    """A fresh, uniquely named bucket; emptied and removed afterwards to keep moto's memory small."""
    name = f"qf-test-{uuid.uuid4().hex[:12]}"
    s3_admin.create_bucket(Bucket=name)
    yield name
    for page in s3_admin.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            s3_admin.delete_object(Bucket=name, Key=obj["Key"])
    s3_admin.delete_bucket(Bucket=name)


@pytest.fixture
def s3_proxy(s3_server: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of moto (no faults until configured); stopped afterwards."""
    host, port = s3_server.removeprefix("http://").rsplit(":", 1)
    proxy = FaultProxy((host, int(port))).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def moto_auth(s3_server: str, s3_admin, s3_bucket: str) -> Iterator[dict[str, str]]:
    """moto with signature and IAM checks on; yields a user's keys that may only list `s3_bucket`.

    The switch is server-wide, so it is switched back off before the fixture returns.
    """
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_server, region_name=TEST_REGION)
    user = f"qf-reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    # AWS authorizes ListObjectsV2 as the IAM action s3:ListBucket; moto 5.2.6 evaluates it as
    # s3:ListObjectsV2 (5.2.5 as s3:ListBucket). Granting both keeps this user "may list, may not
    # read or write" on either, so the tests check quadflow's messages, not moto's action names.
    policy = ('{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", '
              '"Action": ["s3:ListBucket", "s3:ListObjectsV2"], '
              f'"Resource": "arn:aws:s3:::{s3_bucket}"}}]}}')
    iam.put_user_policy(UserName=user, PolicyName="list-only", PolicyDocument=policy)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    _moto_reset_auth(s3_server, "0")
    try:
        yield {"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"]}
    finally:
        _moto_reset_auth(s3_server, "inf")


def _moto_reset_auth(endpoint: str, count: str) -> None:
    """moto's documented switch: authenticate every request after `count` more (inf: never)."""
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                 headers={"Content-Type": "text/plain"})  # a form body would be parsed away
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()
