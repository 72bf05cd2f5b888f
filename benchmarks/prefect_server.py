"""A real Prefect server on a free loopback port, for the benchmarks and tests that need one.

`prefect server start` runs in its own process group with its own PREFECT_HOME and SQLite
database under a work directory, analytics and the UI off. `prefect_server()` waits until the
server's /health answers and stops the whole group on exit (SIGTERM, then SIGKILL after a grace
period); the runs that report to it get `server.env`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 120.0  # a first start creates and migrates the database: slow on a busy 2-core machine


class ServerDidNotStart(RuntimeError):
    """`prefect server start` exited, or /health did not answer in time; the message ends with its log."""


@dataclass(frozen=True)
class LoopbackServer:
    url: str  # the API URL, http://127.0.0.1:<port>/api
    env: dict[str, str]  # os.environ with this server's PREFECT_* settings (and the caller's extras)
    log: Path  # the server's stdout and stderr
    process: subprocess.Popen


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 60) -> str:
    """The last n lines of a log file ('' if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL it after `grace` seconds, and reap `proc`."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextlib.contextmanager
def prefect_server(workdir: Path, extra_env: Mapping[str, str] | None = None,
                   timeout: float = START_TIMEOUT_S, grace: float = 10.0) -> Iterator[LoopbackServer]:
    """Start a Prefect server for `workdir` (home, database and log inside it) and yield it once healthy."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect-home"), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{workdir / 'prefect.db'}",
           **(extra_env or {})}
    env.pop("PREFECT_PROFILE", None)
    log = workdir / "prefect-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                 "127.0.0.1", "--port", str(port)], env=env, cwd=workdir, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc.poll() is not None:
                raise ServerDidNotStart(f"prefect server start exited with {proc.returncode}; {log}:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise ServerDidNotStart(f"the Prefect server at {url} did not answer /health within {timeout:g} s; "
                                        f"{log}:\n{tail(log)}")
            time.sleep(0.5)
        yield LoopbackServer(url=url, env=env, log=log, process=proc)
    finally:
        stop_group(proc, grace)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
