"""Shared fixtures: one Prefect server per test session (it costs ~10 s to start)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Nothing is written into the repository: hypothesis keeps its caches in a temp dir.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.mkdtemp(prefix="quadflow-hypothesis-"))

REPO = Path(__file__).resolve().parents[1]
SAMPLE_POOL = REPO / "examples" / "data" / "pool.jsonl.zst"
SAMPLE_TARGET = REPO / "examples" / "data" / "target.jsonl.zst"


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real (temporary, loopback) Prefect server with result storage in a temp dir."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(storage)}):
        with prefect_test_harness(server_startup_timeout=120):
            yield
from tests.s3util import *  # noqa
