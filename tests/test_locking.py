"""The store lock: a second run over the same store waits (and says for whom), or times out clearly."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from quadflow.locking import StoreLockTimeout, read_owner, store_lock

REPO = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from quadflow.locking import store_lock
with store_lock(sys.argv[1], timeout=5, owner="flow run holder-run (1234)"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(lock: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the lock for `seconds`; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(seconds)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_records_its_owner_while_held_and_clears_it_after(tmp_path):
    lock = tmp_path / "sub" / "store.duckdb.lock"
    with store_lock(lock, owner="flow run nightly-1 (abc)") as held:
        assert held == lock
        assert read_owner(lock).startswith("flow run nightly-1 (abc) since ")
    assert lock.exists() and lock.read_text() == ""
    with store_lock(lock, timeout=0):  # free again at once
        pass


def test_second_process_times_out_naming_the_lock_and_its_holder(tmp_path):
    lock = tmp_path / "store.duckdb.lock"
    holder = _hold(lock, 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreLockTimeout) as err:
            with store_lock(lock, timeout=0.6, poll=0.1):
                pytest.fail("the lock was taken while another process held it")
        assert 0.5 <= time.monotonic() - t0 < 5
        msg = str(err.value)
        assert str(lock) in msg and "flow run holder-run (1234)" in msg and "timeout 0.6s" in msg
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


def test_waiter_logs_the_holder_and_gets_the_lock_when_it_is_released(tmp_path, caplog):
    lock = tmp_path / "store.duckdb.lock"
    holder = _hold(lock, 1.5)
    try:
        with caplog.at_level(logging.INFO, logger="quadflow"):
            t0 = time.monotonic()
            with store_lock(lock, timeout=20, poll=0.05, log_every=0.5, owner="me"):
                waited = time.monotonic() - t0
                assert read_owner(lock).startswith("me since")
        assert waited >= 0.5  # the holder kept it for up to 1.5 s after we started waiting
        waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for store lock")]
        assert waits and f"waiting for store lock {lock} held by flow run holder-run (1234)" in waits[0]
        assert 2 <= len(waits) <= 6  # once at once, then about every log_every seconds
    finally:
        holder.wait()


def test_a_killed_holder_releases_the_lock(tmp_path):
    lock = tmp_path / "store.duckdb.lock"
    holder = _hold(lock, 60)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    with store_lock(lock, timeout=2, poll=0.05):
        assert read_owner(lock) != "flow run holder-run (1234)"


def test_two_opens_in_one_process_also_exclude_each_other(tmp_path):
    lock = tmp_path / "store.duckdb.lock"
    inside, release = threading.Event(), threading.Event()

    def hold():
        with store_lock(lock, owner="thread"):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert inside.wait(10)
        with pytest.raises(StoreLockTimeout, match="held by thread since"):
            with store_lock(lock, timeout=0):
                pass
    finally:
        release.set()
        t.join()


@pytest.mark.parametrize("kwargs, bad", [({"timeout": -1}, "timeout = -1"), ({"poll": 0}, "poll = 0")])
def test_bad_arguments_quote_the_value(tmp_path, kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        with store_lock(tmp_path / "x.lock", **kwargs):
            pass
