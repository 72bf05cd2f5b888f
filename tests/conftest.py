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


def task_run_states(flow_run_id, stages, timeout: float = 60.0) -> dict[str, str]:
    """{task name: state name} of a finished flow run's task runs, once every one of `stages` is final.

    Task run states reach the server as events, a moment after the flow run returns; reading at once
    can miss the last ones (seen on a loaded machine), so this polls until they are all there.
    """
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            final = {tr.name.rsplit("-", 1)[0]: tr.state for tr in runs if tr.state is not None}
            if all(s in final and final[s].is_final() for s in stages) or time.monotonic() > deadline:
                return {name: state.name for name, state in final.items()}
            time.sleep(0.5)


from tests.s3util import *  # noqa
