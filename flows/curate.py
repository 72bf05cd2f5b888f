"""The `curate` flow: ingest -> dedup -> featurize -> cluster (-> semdedup) -> score -> select -> export -> report."""

from __future__ import annotations

import resource

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from quadflow.crashes import claim, mark_crashed, running_here
from quadflow.objectstore import ObjectStoreSettings
from quadflow.settings import IngestSettings, RunSettings, Settings
from quadflow.shards import check_flow_runner, task_runner, text_parts
from quadflow.store import StoreRef, open_store
from quadflow.tasking import IO_RETRIES
from quadflow.tasks.cluster import cluster
from quadflow.tasks.dedup import dedup, semdedup
from quadflow.tasks.export import export
from quadflow.tasks.featurize import featurize
from quadflow.tasks.ingest import ingest, resolve_files
from quadflow.tasks.report import report
from quadflow.tasks.score import score
from quadflow.tasks.select import select


@task(name="open-store", cache_policy=NO_CACHE)
def open_store_task(path: str) -> StoreRef:
    """Never cached: the store's identity is what every stage's cache key hangs on.

    Also records this run in the store and marks runs a killed process left RUNNING as Crashed.
    """
    store = open_store(path)
    runs = running_here()
    gone = claim(store, runs)
    if gone:
        marked = mark_crashed(gone, by=runs[0][1] if runs else "a later run")
        if marked:
            get_run_logger().warning(f"open-store: marked {len(marked)} flow run(s) a killed process left running "
                                     f"as Crashed: {', '.join(marked)}")
    return store


@task(name="resolve-inputs", cache_policy=NO_CACHE, **IO_RETRIES)
def resolve_inputs(settings: IngestSettings, objectstore: ObjectStoreSettings) -> tuple[tuple, tuple]:
    """Never cached: checksums and object listings (size, ETag) must be fresh so changed inputs recompute."""
    files = resolve_files(settings.inputs, objectstore, since=settings.since, dates=settings.partitions)
    targets = resolve_files(settings.targets, objectstore, role="target") if settings.targets else ()
    return files, targets


def _run_name() -> str:
    s = flow_run.parameters.get("settings")
    select = s.get("select", {}) if isinstance(s, dict) else getattr(s, "select", None)
    if select is None:
        return "curate"
    selector = select.get("selector", "quad") if isinstance(select, dict) else select.selector
    budget = select.get("budget_tokens", "?") if isinstance(select, dict) else select.budget_tokens
    return f"curate-{selector}-{budget}tok"


class _FlowCPU:
    """CPU seconds (user + system, every thread) the flow's own process spends per stage, and its peak
    resident memory once each stage is done; shard tasks on the runner's workers are not in either.
    Logged at the end of a run: the coordinator's cost, which does not shrink with more workers."""

    def __init__(self) -> None:
        self.by_stage: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}
        self.start = self._now()

    @staticmethod
    def _now() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def __call__(self, stage: str, fn, *args, **kwargs):
        t0 = self._now()
        try:
            return fn(*args, **kwargs)
        finally:
            self.by_stage[stage] = self.by_stage.get(stage, 0.0) + self._now() - t0
            # ru_maxrss: the process's own high-water mark (KiB on Linux), never its children's
            self.peak_mb[stage] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def line(self) -> str:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in self.by_stage.items())
        return f"flow process CPU: {self._now() - self.start:.1f} s in all; by stage: {stages}"

    def memory_line(self) -> str:
        stages = ", ".join(f"{k} {v:,.0f} MB" for k, v in self.peak_mb.items())
        return (f"flow process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB; "
                f"the high-water mark once each stage is done: {stages}")


@flow(name="curate", flow_run_name=_run_name, validate_parameters=True, task_runner=task_runner(RunSettings()))
def curate(settings: Settings) -> dict:
    """Select a token-budgeted, high-quality, diverse subset of the pool; return where it went."""
    check_flow_runner(settings.run)
    cpu = _FlowCPU()
    store = open_store_task(settings.store)
    files, targets = cpu("resolve", resolve_inputs, settings.ingest, settings.objectstore)
    docs = cpu("ingest", ingest, settings.ingest, files, targets, store, settings.objectstore, settings.run)
    near = cpu("dedup", dedup, settings.dedup, docs, settings.seed, settings.run, settings.objectstore)
    features = cpu("featurize", featurize, settings.featurize, docs, settings.seed, settings.run, settings.objectstore)
    clusters = cpu("cluster", cluster, settings.cluster, features, settings.seed, docs, settings.run,
                   settings.objectstore)
    semantic = cpu("semdedup", semdedup, settings.dedup, near, features, clusters)
    scores = cpu("score", score, settings.score, docs, features, settings.seed, settings.run, settings.objectstore)
    # every stage that reads the pool's shard texts (dedup, featurize, score) is done with them
    cpu("score", text_parts(settings.run, docs.store.path, docs.key, settings.objectstore).clean)
    selection = cpu("select", select, settings.select, docs, features, clusters, scores, settings.seed,
                    dedup=(near, semantic))
    exported = cpu("export", export, settings, files, targets, docs, clusters, scores, selection, features=features)
    reported = cpu("report", report, settings, docs, features, clusters, scores, selection, exported)
    get_run_logger().info(cpu.line())
    get_run_logger().info(cpu.memory_line())
    return {
        "store": store.path,
        "selection": exported.selection_path,
        "manifest": exported.manifest_path,
        "report": reported.report_path,
        "docs": exported.docs,
        "tokens": exported.tokens,
        "summary": reported.summary,
    }


def run_curate(settings: Settings, **kwargs):
    """`curate` with its shard tasks on the task runner `settings.run.runner` names (see quadflow.shards)."""
    return curate.with_options(task_runner=task_runner(settings.run))(settings=settings, **kwargs)
