"""Flow runs a killed process left RUNNING: recorded in the store, marked Crashed by the next run over it.

A run SIGKILLed (or killed by the OOM killer) cannot report its end, so Prefect shows it RUNNING for
ever. Every curate run records itself, and the flows it runs inside in the same process, in the
store's `store_runs` table when it opens the store (host, pid). The next run over the store holds
the store lock, so no other run over it is live: each recorded run whose process is gone and whose
Prefect state is still not final is set to Crashed (with its running task runs), then forgotten.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timezone
from uuid import UUID

from quadflow.store import StoreRef, connect, query_sql, run_sql, transaction

# Flows that run curate in their own process (subflow calls): killed with it, so recorded with it. A
# backfill launches partition runs as deployments in other processes and is never recorded by them.
IN_PROCESS_PARENTS = ("curate-partition", "curate-locked", "nightly")


def _alive(host: str, pid: int) -> bool:
    """Whether the process may still run; on another host we cannot tell, so yes."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process with that pid
        return True
    return True


def claim(store: StoreRef, runs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Record `runs` ((flow run id, name), in this process) in the store; return and forget earlier recorded
    runs whose process is gone."""
    host, pid = socket.gethostname(), os.getpid()
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    with connect(store) as con:
        run_sql(con, "store_runs_create")
        gone = [(rid, name) for rid, name, h, p in query_sql(con, "store_runs_open").fetchall()
                if not _alive(h, int(p))]
        with transaction(con):
            for rid, _ in gone:
                run_sql(con, "store_runs_delete", {"flow_run_id": rid})
            for rid, name in runs:
                run_sql(con, "store_runs_delete", {"flow_run_id": rid})
                run_sql(con, "store_runs_insert", {"flow_run_id": rid, "flow_run_name": name, "host": host,
                                                   "pid": pid, "started_at": now})
    return gone


def running_here() -> list[tuple[str, str]]:
    """(id, name) of the current flow run and of the flows it runs inside in this process; [] outside one."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return []
    runs = [(str(ctx.flow_run.id), ctx.flow_run.name)]
    parent_task = ctx.flow_run.parent_task_run_id
    with get_client(sync_client=True) as client:
        while parent_task is not None:
            parent = client.read_flow_run(client.read_task_run(parent_task).flow_run_id)
            flow = client.read_flow(parent.flow_id)
            if flow.name not in IN_PROCESS_PARENTS:
                break
            runs.append((str(parent.id), parent.name))
            parent_task = parent.parent_task_run_id
    return runs


def mark_crashed(runs: list[tuple[str, str]], by: str) -> list[str]:
    """Set each of `runs` still not in a final state (and its running task runs) to Crashed; returns their names.

    Runs the server does not know (a temporary server's database was reset) are skipped.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState
    from prefect.client.schemas.filters import TaskRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    message = f"the process running this flow run was killed; marked Crashed by {by}, the next run over its store"
    live = [StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED, StateType.PAUSED, StateType.CANCELLING]
    marked = []
    with get_client(sync_client=True) as client:
        for rid, name in runs:
            try:
                fr = client.read_flow_run(UUID(rid))
            except (ObjectNotFound, ValueError):
                continue
            if fr.state is None or fr.state.type not in live:
                continue
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=live))))
            for tr in tasks:
                client.set_task_run_state(tr.id, Crashed(message=message), force=True)
            client.set_flow_run_state(fr.id, Crashed(message=message), force=True)
            marked.append(name)
    return marked
