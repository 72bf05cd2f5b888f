"""Which failures a stage task retries: transient I/O errors yes, bad settings or missing files no."""

from __future__ import annotations

import errno

import pytest
from prefect.states import Failed

from quadflow.settings import ConfigError
from quadflow.tasking import transient_failure


@pytest.mark.parametrize("exc, retried", [
    (ConnectionResetError("reset by peer"), True),
    (TimeoutError("read timed out"), True),
    (OSError("503 Slow Down"), True),
    (ConfigError("invalid setting select.budget_tokens = 0"), False),
    (FileNotFoundError("no such file: pool.jsonl"), False),
    (PermissionError("permission denied: pool.jsonl"), False),
    (ValueError("doc_idx is not dense"), False),
    # a full or read-only disk is still full or read-only after 5 + 30 s of retries
    (OSError(errno.ENOSPC, "No space left on device", "out/selection.parquet"), False),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), False),
    (OSError(errno.EROFS, "Read-only file system", "out/manifest.json"), False),
])
def test_only_transient_failures_are_retried(exc, retried):
    assert transient_failure(None, None, Failed(data=exc)) is retried
