"""Partition flows: one locked curate run per date partition, the nightly run and the backfill.

`settings.ingest.inputs` name partition roots here (see quadflow/partitions.py). Every run
over a store holds `<store>.lock` (quadflow/locking.py) for its whole duration, so two runs
over the same partition queue instead of failing on DuckDB's single-writer lock; different
partitions have different stores and run side by side. `curate` runs as a subflow, untouched,
so its cached tasks behave exactly as in a plain run.
"""

from __future__ import annotations

import time
from datetime import date
from typing import Annotated, Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from pydantic import Field

from quadflow.flows.curate import run_curate
from quadflow.locking import DEFAULT_TIMEOUT, default_owner, store_lock
from quadflow.partitions import (
    lock_path,
    manifest_counts,
    newest_partition,
    not_done_reason,
    partition_settings,
    partitions_between,
    settings_digest,
)
from quadflow.settings import ConfigError, Settings

PARTITION_FLOW = "curate-partition"
PARTITION_DEPLOYMENT = "partition"  # the deployment of curate-partition that backfills fan out to
POLL_SECONDS = 2.0  # between state checks of a backfill's in-flight runs
UNCLAIMED_WARN_SECONDS = 60.0  # warn when a launched run has not started for this long
BACKFILL_ARTIFACT = "quadflow-backfill"
OUTCOME_COLUMNS = ("partition", "status", "docs", "tokens", "flow_run", "output", "manifest", "detail")

LockTimeout = Annotated[float, Field(ge=0, description="Seconds to wait for the store lock before failing.")]
MaxParallel = Annotated[int, Field(ge=1, le=64, description="Partition runs in flight at once.")]


# --------------------------------------------------------------------------------------------
# Run names: partition (or range) and settings, readable in the UI's run list
# --------------------------------------------------------------------------------------------


def _as_settings(value: Any) -> Settings | None:
    if isinstance(value, Settings):
        return value
    try:
        return Settings.model_validate(value)
    except Exception:  # a name must never fail a run; validation reports the real error
        return None


def _as_date(value: Any) -> str:
    return value.isoformat() if isinstance(value, date) else str(value)


def settings_label(settings: Settings | None) -> str:
    """selector, budget and a short digest of every setting: `quad-30000tok-1a2b3c4d`."""
    if settings is None:
        return "invalid-settings"
    s = settings.select
    return f"{s.selector}-{s.budget_tokens}tok-{settings_digest(settings)[:8]}"


def partition_run_name(settings: Settings | None, partition: Any, force: bool = False) -> str:
    return f"partition-{_as_date(partition)}-{settings_label(settings)}" + ("-force" if force else "")


def _partition_run_name() -> str:
    p = flow_run.parameters
    return partition_run_name(_as_settings(p.get("settings")), p.get("partition"), bool(p.get("force")))


def _nightly_run_name() -> str:
    settings = _as_settings(flow_run.parameters.get("settings"))
    try:
        newest = newest_partition(settings.ingest.inputs, settings.objectstore).isoformat() if settings else "none"
    except ConfigError:
        newest = "none"
    return f"nightly-{newest}-{settings_label(settings)}"


def _backfill_run_name() -> str:
    p = flow_run.parameters
    force = "-force" if p.get("force") else ""
    label = settings_label(_as_settings(p.get("settings")))
    return f"backfill-{_as_date(p.get('start'))}..{_as_date(p.get('end'))}-{label}{force}"


def _locked_run_name() -> str:
    return f"curate-locked-{settings_label(_as_settings(flow_run.parameters.get('settings')))}"


def _owner() -> str:
    """Written into the lock file so a waiting run can say whom it waits for."""
    run_id, name = flow_run.id, flow_run.name
    who = f"flow run {name} ({run_id}), " if run_id else ""
    return who + default_owner()


# --------------------------------------------------------------------------------------------
# Outcomes
# --------------------------------------------------------------------------------------------


def outcome(partition: date, status: str, settings: Settings | None = None, detail: str = "",
            flow_run_name: str | None = None) -> dict[str, Any]:
    """One partition's result: status done/skipped/failed with the published counts when there are any."""
    row: dict[str, Any] = {"partition": partition.isoformat(), "status": status, "docs": None, "tokens": None,
                           "flow_run": flow_run_name, "output": None, "manifest": None, "detail": detail}
    if settings is not None and status != "failed":
        row.update(manifest_counts(settings))
    return row


# --------------------------------------------------------------------------------------------
# Flows
# --------------------------------------------------------------------------------------------


@flow(name="curate-locked", flow_run_name=_locked_run_name, validate_parameters=True)
def curate_locked(settings: Settings, lock_timeout: LockTimeout = DEFAULT_TIMEOUT) -> dict:
    """`curate` holding its store's lock, so concurrent runs over one store queue instead of failing."""
    with store_lock(lock_path(settings), timeout=lock_timeout, owner=_owner()):
        return run_curate(settings)


@flow(name=PARTITION_FLOW, flow_run_name=_partition_run_name, validate_parameters=True, persist_result=True)
def curate_partition(settings: Settings, partition: date, force: bool = False,
                     lock_timeout: LockTimeout = DEFAULT_TIMEOUT) -> dict:
    """Curate one date partition into its own store and output; skip it when its output is current."""
    log = get_run_logger()
    ps = partition_settings(settings, partition)
    run_name = flow_run.name
    if not force:
        reason = not_done_reason(ps)
        if reason is None:
            log.info(f"partition {partition}: already done with these settings in {ps.export.output}; skipped")
            return outcome(partition, "skipped", ps, "already done", run_name)
        log.info(f"partition {partition}: curating ({reason})")
    with store_lock(lock_path(ps), timeout=lock_timeout, owner=_owner()):
        if not force and not_done_reason(ps) is None:  # a run we waited for did it meanwhile
            log.info(f"partition {partition}: finished by the run that held the lock; skipped")
            return outcome(partition, "skipped", ps, "done by a concurrent run", run_name)
        run_curate(ps)
    return outcome(partition, "done", ps, "forced" if force else "", run_name)


@flow(name="nightly", flow_run_name=_nightly_run_name, validate_parameters=True, persist_result=True)
def nightly(settings: Settings, lock_timeout: LockTimeout = DEFAULT_TIMEOUT) -> dict:
    """Curate the newest partition of the roots (the scheduled run)."""
    newest = newest_partition(settings.ingest.inputs, settings.objectstore)
    get_run_logger().info(f"nightly: newest partition is {newest}")
    return curate_partition(settings=settings, partition=newest, lock_timeout=lock_timeout)


def _final_outcome(run: FlowRun, partition: date, settings: Settings) -> dict[str, Any]:
    """The outcome of a finished partition run: its returned dict, or what the manifest says."""
    state = run.state
    if state is None or not state.is_completed():
        name = state.name if state else "unknown"
        message = (state.message or "").strip() if state else ""
        return outcome(partition, "failed", detail=f"{name}: {message}" if message else name,
                       flow_run_name=run.name)
    try:
        result = state.result(raise_on_failure=False)
    except Exception:  # result storage not shared with the runner: fall back to the manifest
        result = None
    if isinstance(result, dict) and result.get("status") in ("done", "skipped"):
        return {**result, "flow_run": run.name}
    return outcome(partition, "done", partition_settings(settings, partition),
                   "counts from the manifest (the run's result is not readable here)", run.name)


def _publish(outcomes: list[dict[str, Any]], start: date, end: date) -> None:
    counts = {s: sum(o["status"] == s for o in outcomes) for s in ("done", "skipped", "failed")}
    create_table_artifact(
        key=BACKFILL_ARTIFACT,
        table=[{c: o.get(c) for c in OUTCOME_COLUMNS} for o in outcomes],
        description=f"Backfill {start}..{end}: {counts['done']} done, {counts['skipped']} skipped, "
        f"{counts['failed']} failed",
    )


@flow(name="backfill", flow_run_name=_backfill_run_name, validate_parameters=True, persist_result=True)
def backfill(settings: Settings, start: date, end: date, force: bool = False, max_parallel: MaxParallel = 2,
             deployment: str = PARTITION_DEPLOYMENT) -> list[dict]:
    """One curate-partition run per existing partition in [start, end], at most max_parallel at once.

    Done partitions are skipped without a run unless `force`. Each launched run is its own flow
    run of the `curate-partition/<deployment>` deployment (a subflow of this one in the UI).
    Publishes the per-partition outcomes as the `quadflow-backfill` table artifact; fails when any
    partition failed.
    """
    log = get_run_logger()
    dates = partitions_between(settings.ingest.inputs, start, end, settings.objectstore)
    if not dates:
        raise ConfigError(f"no partition between {start} and {end} in {settings.ingest.inputs!r}")
    outcomes: dict[date, dict[str, Any]] = {}
    todo: list[date] = []
    for d in dates:
        ps = partition_settings(settings, d)
        reason = "forced" if force else not_done_reason(ps)
        if reason is None:
            outcomes[d] = outcome(d, "skipped", ps, "already done")
        else:
            log.info(f"backfill: partition {d} is due: {reason}")
            todo.append(d)
    log.info(f"backfill {start}..{end}: {len(dates)} partitions, {len(todo)} to run, "
             f"{len(outcomes)} already done; at most {max_parallel} at once")

    target = f"{PARTITION_FLOW}/{deployment}"
    params = settings.model_dump(mode="json")
    in_flight: dict[UUID, tuple[date, float]] = {}
    warned: set[UUID] = set()
    with get_client(sync_client=True) as client:
        if todo:
            try:
                client.read_deployment_by_name(target)
            except ObjectNotFound:
                raise ConfigError(f"deployment {target!r} does not exist: serve it (python deployments/serve.py) "
                                  f"or deploy it (prefect deploy), or name another with `deployment`") from None
        while todo or in_flight:
            while todo and len(in_flight) < max_parallel:
                d = todo.pop(0)
                run = run_deployment(
                    target, timeout=0,
                    parameters={"settings": params, "partition": d.isoformat(), "force": force},
                    flow_run_name=partition_run_name(settings, d, force),
                )
                log.info(f"backfill: launched {run.name} for partition {d}")
                in_flight[run.id] = (d, time.monotonic())
            time.sleep(POLL_SECONDS)
            for run_id, (d, launched) in list(in_flight.items()):
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    outcomes[d] = _final_outcome(run, d, settings)
                    log.info(f"backfill: partition {d}: {outcomes[d]['status']} ({run.name})")
                    del in_flight[run_id]
                elif (run.state is None or run.state.is_scheduled()) and run_id not in warned \
                        and time.monotonic() - launched > UNCLAIMED_WARN_SECONDS:
                    log.warning(f"backfill: {run.name} has not started after {UNCLAIMED_WARN_SECONDS:.0f}s: "
                                f"is {target} being served (deployments/serve.py) or a worker running?")
                    warned.add(run_id)

    ordered = [outcomes[d] for d in dates]
    _publish(ordered, start, end)
    failed = [o for o in ordered if o["status"] == "failed"]
    if failed:
        lines = "; ".join(f"{o['partition']} ({o['flow_run']}): {o['detail']}" for o in failed)
        raise RuntimeError(f"backfill {start}..{end}: {len(failed)} of {len(ordered)} partitions failed: {lines}")
    return ordered
