"""Logging that goes to the Prefect run log inside a run and to stderr outside one."""

from __future__ import annotations

import logging
import time


def get_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            return get_run_logger()
        except MissingContextError:
            pass
    except ImportError:  # pragma: no cover - prefect is a hard dependency
        pass
    return logging.getLogger("quadflow")


class Progress:
    """Logs `done/total` for a long stage at most every `every` seconds, and once at the end."""

    def __init__(self, stage: str, total: int | None, unit: str = "docs", every: float = 5.0):
        self.stage, self.total, self.unit, self.every = stage, total, unit, every
        self.done = 0
        self._start = self._last = time.monotonic()
        self._log = get_logger()
        self._artifact = _progress_artifact(stage, total)

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._emit(now)

    def close(self) -> None:
        self._emit(time.monotonic(), final=True)

    def _emit(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            pct = 100.0 * self.done / self.total
            msg = f"{self.stage}: {self.done:,}/{self.total:,} {self.unit} ({pct:.0f}%), {rate:,.0f} {self.unit}/s"
        else:
            msg = f"{self.stage}: {self.done:,} {self.unit}, {rate:,.0f} {self.unit}/s"
        if final:
            msg += f", done in {elapsed:.1f}s"
        self._log.info(msg)
        if self._artifact is not None and self.total:
            _update_progress(self._artifact, 100.0 if final else min(100.0, 100.0 * self.done / self.total))


def _progress_artifact(stage: str, total: int | None):
    """A progress bar in the Prefect UI for a long stage, when running inside a task run."""
    if not total:
        return None
    try:
        from prefect.artifacts import create_progress_artifact
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is None:
            return None
        return create_progress_artifact(progress=0.0, description=f"{stage}: {total:,} to do")
    except Exception as e:  # the UI's progress bar must never fail the data work
        logging.getLogger("quadflow").debug(f"no progress artifact for {stage}: {e}")
        return None


def _update_progress(artifact_id, progress: float) -> None:
    try:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(artifact_id=artifact_id, progress=progress)
    except Exception as e:  # as above: display only
        logging.getLogger("quadflow").debug(f"progress artifact update failed: {e}")


def drain_prefect_workers() -> None:
    """Send this process's buffered run logs and events now, while the Prefect server is still up."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # never started: nothing was logged in this process
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())
