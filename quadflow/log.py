"""Logging that goes to the Prefect run log inside a run and to stderr outside one."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


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


class _Stderr(logging.StreamHandler):
    """A handler on whatever sys.stderr is when a record is emitted (a redirect or a test's capture)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: D102 - logging.StreamHandler's attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def named_error(err: BaseException | None) -> bool:
    """Whether `err` is one of quadflow's named failures (bad settings or input, a full or read-only disk),
    whose message says all there is to say."""
    from quadflow.settings import ConfigError
    from quadflow.store import storage_problem

    return err is not None and (isinstance(err, ConfigError) or storage_problem(err) is not None)


class _NoTracebackForNamedErrors(logging.Filter):
    """Prefect logs a failed flow run with its traceback; for a named error the one-line message is the report."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and named_error(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


@contextmanager
def to_stderr(level: int = logging.INFO) -> Iterator[None]:
    """How a command reports: quadflow's own messages outside a flow run on stderr, no tracebacks for named errors.

    Without a handler the "quadflow" logger reaches only Python's last-resort handler, which drops
    everything below WARNING: a run waiting on a lock printed nothing. And a bad --text-field ended in
    Prefect's traceback of the flow run before the one-line error. Restored on exit.
    """
    logger = logging.getLogger("quadflow")
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("quadflow: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # Prefect's root console handler would print warnings a second time
    quiet = _NoTracebackForNamedErrors()
    for name in _RUN_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    try:
        yield
    finally:
        for name in _RUN_LOGGERS:
            logging.getLogger(name).removeFilter(quiet)
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


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
