"""An exclusive advisory lock per store, so runs over the same DuckDB file queue instead of failing.

DuckDB lets one process write a database file; a second writer fails at once with "Could not set
lock on file". A run takes `<store>.lock` with fcntl.flock for its whole duration instead, so a
second run over the same store waits its turn (and says who it waits for) and gives up after a
timeout. flock locks belong to the open file: the kernel drops them when the holder exits or
crashes, so a stale lock file never blocks anyone. The file itself is never deleted (deleting a
lock file races with a process that has just opened it). flock is local to one machine; it is not
reliable on NFS, so runs over one store must share a host.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from quadflow.log import get_logger

DEFAULT_TIMEOUT = 3600.0  # s: a full run over the 354k-document pool takes minutes, not an hour
DEFAULT_POLL = 0.5  # s between attempts
LOG_EVERY = 10.0  # s between "waiting for store lock" messages
_UNKNOWN = "an unknown holder (the lock file names no owner yet)"


class StoreLockTimeout(TimeoutError):
    """The store lock was not free within the timeout; the message names the lock and its holder."""


def store_lock_path(store: str | Path) -> Path:
    """The lock file every run over a store holds (and `quadflow report` waits on): `<store>.lock`."""
    return Path(f"{store}.lock")


def default_owner() -> str:
    """Who this process is, as written into the lock file: pid and host."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def read_owner(path: str | Path) -> str:
    """The owner line the current holder wrote into the lock file (or a placeholder)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return _UNKNOWN
    return text.splitlines()[0] if text else _UNKNOWN


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


@contextmanager
def store_lock(
    path: str | Path,
    timeout: float | None = DEFAULT_TIMEOUT,
    poll: float = DEFAULT_POLL,
    owner: str | None = None,
    log_every: float = LOG_EVERY,
) -> Iterator[Path]:
    """Hold an exclusive flock on `path` (created if needed) for the body of the `with`.

    Waits while another process (or another open of the file) holds it, logging
    "waiting for store lock <path> held by <owner>" at once and every `log_every` seconds,
    and raises StoreLockTimeout after `timeout` seconds (None waits forever, 0 tries once).
    The holder writes `owner` (default: pid and host) into the file for waiters to report.
    """
    if timeout is not None and timeout < 0:
        raise ValueError(f"store lock timeout = {timeout!r}: must be >= 0 seconds (or None to wait forever)")
    if poll <= 0:
        raise ValueError(f"store lock poll = {poll!r}: must be > 0 seconds")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    me = owner or default_owner()
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        last_log: float | None = None
        while not _try_lock(fd):
            now = time.monotonic()
            waited = now - start
            holder = read_owner(p)
            if timeout is not None and waited >= timeout:
                raise StoreLockTimeout(
                    f"gave up waiting for store lock {p} after {waited:.0f}s (timeout {timeout:g}s): "
                    f"held by {holder}. Another run over the same store is still going; wait for it "
                    f"or cancel it. A crashed holder releases the lock by itself."
                )
            if last_log is None or now - last_log >= log_every:
                get_logger().info(f"waiting for store lock {p} held by {holder} ({waited:.0f}s so far)")
                last_log = now
            time.sleep(poll)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{me} since {stamp}\n".encode("utf-8"), 0)
        if last_log is not None:
            get_logger().info(f"got store lock {p} after {time.monotonic() - start:.0f}s")
        try:
            yield p
        finally:
            os.ftruncate(fd, 0)  # still holding the lock: waiters never read a stale owner
    finally:
        os.close(fd)  # releases the flock
