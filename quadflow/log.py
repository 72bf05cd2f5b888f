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
