"""How stage tasks cache: on their inputs (settings section + small refs) and their source."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

# The default policy never hits across runs; INPUTS + TASK_SOURCE does. Inputs are small refs
# that carry the store's identity, so a deleted or replaced store recomputes everything.
CACHE_POLICY = INPUTS + TASK_SOURCE


def stage_task(name: str, cache_policy=CACHE_POLICY, **kwargs):
    """Decorator for a cached stage task whose result (a StageRef) is persisted across runs."""
    return task(name=name, cache_policy=cache_policy, persist_result=True, **kwargs)


def transient_failure(task, task_run, state) -> bool:
    """Retry only what can succeed on a second try: I/O hiccups, not bad settings or bad data."""
    from quadflow.settings import ConfigError

    try:
        state.result()
    except ConfigError:
        return False
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
        return False
    except OSError as e:
        from quadflow.store import NO_SPACE_ERRNOS, NO_WRITE_ERRNOS

        # a full or read-only disk stays so for the 35 s of retries: fail now, naming it
        return e.errno not in NO_SPACE_ERRNOS | NO_WRITE_ERRNOS
    except Exception:
        return False
    return False


# For stages that read inputs or write outputs: two retries, 5 s then 30 s apart, transient errors only.
IO_RETRIES = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": transient_failure}

# Stages that run shards take `run` (runner, workers, shard size, parts location) and `objectstore` (where an
# s3:// parts prefix is): how they run, never what they compute, so both stay out of the cache key.
SHARDED_CACHE_POLICY = (INPUTS - "run" - "objectstore") + TASK_SOURCE
