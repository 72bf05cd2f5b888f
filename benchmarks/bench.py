"""Selection quality, side by side: every method at one token budget, judged on held-out target text.

    python -m benchmarks.bench --mode quick                 # ~30k-document pools, 1 seed: minutes
    python -m benchmarks.bench --mode full --seeds 3        # the whole pool, 3 seeds per random method
    python -m benchmarks.bench --mode quick --tasks python-docs --no-package
    python -m benchmarks.bench --mode quick --transformer on      # + the transformer second opinion on any device

For each task (benchmarks/eval/tasks.py: a target domain cut out of the pool, with a target
sample and a disjoint held-out set) the pipeline's pool stages run once (ingest, featurize,
cluster, score with heuristic + dsir + classifier; their task functions called directly, on a
store under <out>/<task>/), then every method selects at the same budget:

- random; top-k by each scorer (heuristic, dsir, classifier, combined); quadflow's DSIR
  importance resampling; the Quad bandit probing with each scorer (combined, dsir, classifier,
  heuristic), all through `quadflow.tasks.select.run_selector`;
- `quad-influence`, the Quad bandit probing with the influence scorer (select.probe_scorer =
  influence), when torch is importable: its scorer is fitted once per task pool as the score
  stage fits it (`quadflow.tasks.score.ensure_influence_state`, state kept beside the store) with
  BENCH_INFLUENCE's CPU-sized settings, and scores only the documents the bandit probes;
- the published DSIR package (`data-selection`, benchmarks/eval/dsir_external.py), one seed; its
  selection is kept next to the store and reused while pool, target, budget and settings are
  unchanged (it takes minutes on the full pool; --force reruns it);
- two references, not competitors, that read the domain labels no selector sees:
  `oracle-domain` takes the pool's in-domain documents first, then random ones, to the budget;
  `oracle-clusters` takes whole clusters, purest in-domain first: the best any selector that
  accepts or rejects whole clusters (as the Quad bandit does) could do with these clusters.

Each selection is scored by the held-out perplexity of a Kneser-Ney trigram model trained on it
alone (one vocabulary per task, `task_vocab`), KL reduction on hashed n-grams against the target
sample (DSIR's metric), diversity (clusters covered, source entropy), the source mix and the
share of tokens from the target domain. A second opinion (`--transformer`, default auto: only
when a GPU is present) trains a tiny byte-level transformer on each selection for the same fixed
number of tokens and reports its held-out perplexity per byte (benchmarks/eval/transformer_lm.py);
its columns are blank when it is skipped, and results.md says why. `check_protocol` checks that no selected id is held out
and every run spent the budget (within 2%); a violation fails the run after the results are
written. Quad runs also report why they did what they did: acceptance rate, clusters explored,
probe-score spread, stop reason and the share of the budget filled after the bandit stopped.

Outputs in --out (default runs/bench): results.csv (one row per method run), results.md (the
tables), perplexity.png and kl_reduction.png (and ppl_transformer.png when the second opinion ran). Pipeline stages are reused across runs while their
inputs, settings and code versions are unchanged (--force recomputes them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import zstandard

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO))

from benchmarks.eval.metrics import ProtocolError, check_protocol, evaluate_selection  # noqa: E402
from benchmarks.eval.ngram_lm import Vocab  # noqa: E402
from benchmarks.eval.tasks import TASKS, Task, build_tasks, iter_lines, load_task, task_vocab  # noqa: E402
from benchmarks.eval.transformer_lm import (  # noqa: E402
    PRESETS, TRANSFORMER_COLUMNS, TransformerLMConfig, TransformerPlan, describe, encode_eval, evaluate_transformer,
    plan_transformer, preset,
)
from benchmarks.stages import PeakRSS  # noqa: E402
from quadflow.metrics import cluster_coverage, entropy, kl_divergence, source_mix  # noqa: E402
from quadflow.settings import InfluenceSettings, Settings, build_settings, influence_available  # noqa: E402
from quadflow.shards import text_parts  # noqa: E402
from quadflow.store import StageRef, StoreRef, connect, fingerprint, open_store, query_sql  # noqa: E402
from quadflow.text import content_hash, count_tokens_expr  # noqa: E402

DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "debian-pool-v1.jsonl.zst"
DEFAULT_TASKS_DIR = REPO / "runs" / "eval-tasks"
DEFAULT_OUT = REPO / "runs" / "bench"

SCORERS = ("heuristic", "dsir", "classifier")
COMBINED = "combined"
# Every method spends this share of the pool's tokens: 2% of the full Debian pool is ~1M tokens,
# about what each task's in-domain pool holds (0.85M-7.6M), so a selector that finds the domain
# can fill most of the budget with it and one that does not cannot.
DEFAULT_BUDGET_FRACTION = 0.02
SAMPLE_SEED = 2026  # the quick mode's pool subsample: a hash of (seed, id) decides, not file order
INFLUENCE = "influence"
# quad-influence's scorer: the pipeline's default proxy (score.influence defaults: 1 block, d_model
# 64, byte-level, 128-byte context, 300 steps on 5,000 pool documents; EK-FAC on the attention
# layers from 1,000 pool documents) on one torch thread. On this 2-core machine that is about 12 s
# to train and fit and about 800 documents/s for the probes (BENCHMARKS.md, "Influence scorer");
# the bandit probes about 1% of a full pool. Override with --influence '{...}' (score.influence keys).
BENCH_INFLUENCE = {"threads": 1}


@dataclass(frozen=True)
class Mode:
    """How big a run is: the pool size per task (None: the whole pool) and seeds per random method."""

    name: str
    pool_docs: int | None
    seeds: int


MODES = {"quick": Mode("quick", 30_000, 1), "full": Mode("full", None, 3)}


@dataclass(frozen=True)
class MethodSpec:
    """One way of choosing documents; `seeded` methods run once per seed."""

    name: str
    kind: str  # random | topk | dsir | quad | package | oracle | oracle_clusters
    scorer: str | None = None  # top-k's score; quad's probe scorer (None: the run's default)
    seeded: bool = False
    reference: bool = False  # a ceiling that reads labels selectors never see, not a competitor
    select: tuple[tuple[str, Any], ...] = ()  # quad: select settings that differ from the run's
    one_cluster: bool = False  # quad: every document in one cluster (the ablation without the cluster stage)
    dedup: bool = True  # select from the pool less dedup's drops, as a default run does


# Per-document selectors: the baselines `quad` (quadflow's default run) must beat.
PER_DOCUMENT = ("topk-heuristic", "topk-dsir", "topk-classifier", "topk-combined", "dsir-resample", "dsir-package")
METHODS = (
    MethodSpec("random", "random", seeded=True),
    *(MethodSpec(f"topk-{s}", "topk", s) for s in (*SCORERS, COMBINED)),
    MethodSpec("dsir-resample", "dsir", seeded=True),
    MethodSpec("quad", "quad", seeded=True),  # the default quadflow run: two-level Quad
    # ablations of the default: no novelty discount, no clusters (one arm), the published random blocks
    MethodSpec("quad-no-diversity", "quad", seeded=True, select=(("diversity", False),)),
    MethodSpec("quad-one-cluster", "quad", seeded=True, one_cluster=True),
    MethodSpec("quad-paper", "quad", "classifier", seeded=True, select=(("blocks", "random"),)),
    MethodSpec("quad-no-dedup", "quad", seeded=True, dedup=False),
    MethodSpec(f"quad-{INFLUENCE}", "quad", INFLUENCE, seeded=True),  # only where torch is importable
    MethodSpec("dsir-package", "package"),
    MethodSpec("oracle-domain", "oracle", seeded=True, reference=True),
    MethodSpec("oracle-clusters", "oracle_clusters", seeded=True, reference=True),
)
METHOD_NAMES = tuple(m.name for m in METHODS)


@dataclass(frozen=True)
class BenchConfig:
    """Everything a benchmark run depends on; the CLI fills it, tests build it directly."""

    mode: Mode
    tasks: tuple[str, ...]
    seeds: int
    out: Path = DEFAULT_OUT
    tasks_dir: Path = DEFAULT_TASKS_DIR
    source: Path = DEFAULT_SOURCE
    budget_tokens: int | None = None  # None: DEFAULT_BUDGET_FRACTION of the bench pool's tokens
    package: bool = True  # run the published DSIR package
    package_num_proc: int = 2
    package_min_length: int = 100  # the package's min_example_length (its default)
    vocab_size: int = 50_000
    vocab_pool_tokens: int = 2_000_000
    force: bool = False
    pipeline: dict = field(default_factory=dict)  # overrides of the pipeline settings (featurize, cluster, ...)
    methods: tuple[str, ...] | None = None  # None: every method (quad-influence only where torch is importable)
    influence: dict = field(default_factory=lambda: dict(BENCH_INFLUENCE))  # score.influence for quad-influence
    transformer: str = "auto"  # the second opinion: auto (only with a GPU), on, off
    transformer_preset: str | None = None  # None: 'small' on a GPU, 'tiny' on the CPU
    transformer_tokens: int | None = None  # training tokens per selection; None: the preset's
    transformer_seed: int = 0  # one seed for every method: the selection is the only difference


# --------------------------------------------------------------------------------------------
# Pools
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sample_key(doc_id: str, seed: int = SAMPLE_SEED) -> float:
    """A document's place in the deterministic subsample order: uniform in [0, 1) from (seed, id)."""
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def subsample_jsonl(src: Path, dst: Path, n_docs: int, seed: int = SAMPLE_SEED) -> dict:
    """Write the `n_docs` records of `src` with the smallest sample keys to `dst` (.jsonl.zst), in file order.

    Nested: the first n of a larger sample are the smaller sample. Reuses `dst` while its sidecar
    names the same source, size and seed.
    """
    meta_path = dst.with_name(dst.name + ".json")
    want = {"source_sha256": _sha256(src), "n_docs": n_docs, "seed": seed}
    if dst.exists() and meta_path.exists():
        have = json.loads(meta_path.read_text())
        if {k: have.get(k) for k in want} == want and have.get("sha256") == _sha256(dst):
            return have
    keys = [sample_key(str(json.loads(line)["id"]), seed) for line in iter_lines(src)]
    if n_docs >= len(keys):
        cut = math.inf
    else:
        cut = np.partition(np.asarray(keys), n_docs - 1)[n_docs - 1]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    kept = 0
    with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
        for key, line in zip(keys, iter_lines(src)):
            if key <= cut and kept < n_docs:
                out.write((line + "\n").encode("utf-8"))
                kept += 1
    os.replace(tmp, dst)
    meta = want | {"kept": kept, "source_docs": len(keys), "sha256": _sha256(dst)}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# --------------------------------------------------------------------------------------------
# Pipeline stages (run once per task pool, reused while nothing they depend on changed)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineRefs:
    """The pool stages' outputs for one task pool."""

    store: StoreRef
    docs: StageRef
    features: StageRef
    clusters: StageRef
    scores: StageRef
    dedup: tuple[StageRef, ...] = ()  # near-duplicate and semantic dedup partitions (what the default run drops)


_REF_TABLES = {  # how each stage fingerprints its partition (the tasks' own make_ref calls)
    "ingest": ("ingest_docs", ["role", "doc_idx", "doc_id", "n_tokens"]),
    "featurize": ("featurize_vectors", ["role", "doc_idx", "vec"]),
    "cluster": ("cluster_assignments", ["doc_idx", "cluster"]),
    "score": ("score_docs", ["doc_idx", "scorer", "score"]),
    "dedup": ("dedup_duplicates", ["doc_idx", "component", "representative", "reason"]),
    "semdedup": ("dedup_duplicates", ["doc_idx", "component", "representative", "reason"]),
}


def pipeline_settings(store: Path, pool: Path, target: Path, budget: int, overrides: dict) -> Settings:
    """The run settings every method of a task shares (the select section only carries the budget)."""
    base = {
        "store": str(store),
        "seed": 0,
        "ingest": {"inputs": [str(pool)], "targets": [str(target)]},
        "score": {"scorers": list(SCORERS)},
        "select": {"budget_tokens": int(budget)},
    }
    for section, values in overrides.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    return build_settings(overrides=base)


def _versions() -> dict[str, str]:
    import quadflow.tasks.cluster
    import quadflow.tasks.dedup
    import quadflow.tasks.featurize
    import quadflow.tasks.ingest
    import quadflow.tasks.score

    return {"ingest": quadflow.tasks.ingest.VERSION, "featurize": quadflow.tasks.featurize.VERSION,
            "cluster": quadflow.tasks.cluster.VERSION, "score": quadflow.tasks.score.VERSION,
            "dedup": quadflow.tasks.dedup.VERSION, "semdedup": quadflow.tasks.dedup.SEMANTIC_VERSION}


def _ref_from(d: dict) -> StageRef:
    return StageRef(stage=d["stage"], key=d["key"], store=StoreRef(**d["store"]), rows=d["rows"],
                    fingerprint=d["fingerprint"])


def _reusable(state_path: Path, want: dict) -> tuple[PipelineRefs, list[dict]] | None:
    """The recorded refs and timings if inputs, settings and versions match and the partitions are intact."""
    if not state_path.exists():
        return None
    try:
        state = json.loads(state_path.read_text())
        if state.get("inputs") != want:
            return None
        refs = {name: _ref_from(d) for name, d in state["refs"].items()}
        store = refs["ingest"].store
        with connect(store, read_only=True) as con:
            for name, ref in refs.items():
                table, cols = _REF_TABLES[name]
                if fingerprint(con, table, ref.key, cols) != ref.fingerprint:
                    return None
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, duckdb.Error):
        return None  # a missing, damaged or replaced record or store: recompute
    return (PipelineRefs(store, refs["ingest"], refs["featurize"], refs["cluster"], refs["score"],
                         (refs["dedup"], refs["semdedup"])),
            state["timings"])


def run_pipeline(settings: Settings, state_path: Path, force: bool = False,
                 log: Callable[[str], None] = print) -> tuple[PipelineRefs, list[dict]]:
    """Ingest, featurize, cluster and score the task pool (task functions, no Prefect); time each stage."""
    from quadflow.tasks.cluster import cluster
    from quadflow.tasks.dedup import dedup, semdedup
    from quadflow.tasks.featurize import featurize
    from quadflow.tasks.ingest import expand_inputs, fingerprint_files, ingest
    from quadflow.tasks.score import score

    files = fingerprint_files(expand_inputs(settings.ingest.inputs))
    targets = fingerprint_files(expand_inputs(settings.ingest.targets))
    want = {
        "files": [f.sha256 for f in files], "targets": [f.sha256 for f in targets],
        "settings": settings.model_dump(mode="json", exclude={"select", "export", "store"}),
        "store": str(Path(settings.store).resolve()), "versions": _versions(),
    }
    if not force:
        reused = _reusable(state_path, want)
        if reused is not None:
            log(f"  pipeline: reusing the stages recorded in {state_path}")
            return reused
    store = open_store(settings.store)
    timings: list[dict] = []
    sampler = PeakRSS()

    def timed(stage: str, fn, *args):
        sampler.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args)
        row = {"stage": stage, "seconds": round(time.perf_counter() - t0, 2),
               "cpu_seconds": round(time.process_time() - c0, 2), "peak_rss_mb": round(sampler.peak)}
        timings.append(row)
        log(f"  {stage:>9}: {row['seconds']:7.1f} s  peak RSS {row['peak_rss_mb']:6.0f} MB")
        return out

    try:
        docs = timed("ingest", ingest.fn, settings.ingest, files, targets, store)
        near = timed("dedup", dedup.fn, settings.dedup, docs, settings.seed)
        feats = timed("featurize", featurize.fn, settings.featurize, docs, settings.seed)
        clus = timed("cluster", cluster.fn, settings.cluster, feats, settings.seed, docs)
        semantic = timed("semdedup", semdedup.fn, settings.dedup, near, feats, clus)
        scores = timed("score", score.fn, settings.score, docs, feats, settings.seed)
        text_parts(settings.run, docs.store.path, docs.key).clean()  # as the flow does once score has run
    finally:
        sampler.stop()
    refs = PipelineRefs(store, docs, feats, clus, scores, (near, semantic))
    state = {"inputs": want, "timings": timings,
             "refs": {"ingest": asdict(docs), "featurize": asdict(feats), "cluster": asdict(clus),
                      "score": asdict(scores), "dedup": asdict(near), "semdedup": asdict(semantic)}}
    state_path.write_text(json.dumps(state, indent=2) + "\n")
    return refs, timings


# --------------------------------------------------------------------------------------------
# What selectors and the evaluation read from the store
# --------------------------------------------------------------------------------------------


@dataclass
class PoolData:
    """The task pool as the pipeline left it, indexed by doc_idx."""

    doc_id: np.ndarray  # (n,) content hash
    ids: np.ndarray  # (n,) the source's own id (`id` field), what the protocol checks
    sources: np.ndarray  # (n,) source field
    tokens: np.ndarray  # (n,) int64 quadflow tokens
    texts: pl.Series  # (n,) str
    clusters: np.ndarray  # (n,) int
    k: int
    neighbors: pl.DataFrame
    gamma: float
    scores: dict[str, np.ndarray]  # scorer -> (n,) float64, incl. combined
    log_weights: np.ndarray  # (n,) DSIR log importance weights (quadflow's)
    pool_ngrams: np.ndarray  # (buckets,) summed hashed 1-2-gram counts of the pool
    target_ngrams: np.ndarray  # (buckets,) the same for the target sample
    n_buckets: int
    max_chars: int
    ngrams: Any = None  # (n, buckets) CSR hashed 1-2-gram counts of every pool document (quad's novelty)
    classifier_params: dict | None = None  # the classifier's score_info params (quad's target tiers)
    keep: np.ndarray | None = None  # (n,) bool: not dropped by dedup (the pool a default run's selector sees)

    def __post_init__(self):
        self._by_id = {str(x): i for i, x in enumerate(self.ids.tolist())}
        self._by_hash = {h: i for i, h in enumerate(self.doc_id.tolist())}

    def position(self, source_id: str) -> int:
        """doc_idx of the document with this source id, -1 if ingest did not keep it (an exact copy)."""
        return self._by_id.get(str(source_id), -1)

    def locate(self, ids: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """doc_idx of each document (by id, else by content: ingest keeps one of exact copies), -1 if absent."""
        out = np.full(len(ids), -1, dtype=np.int64)
        for i, (x, t) in enumerate(zip(ids, texts)):
            j = self._by_id.get(str(x))
            if j is None:
                j = self._by_hash.get(content_hash(t))
            if j is not None:
                out[i] = j
        return out


def load_pool_data(refs: PipelineRefs, settings: Settings) -> PoolData:
    """Read ids, tokens, texts, clusters, neighbours, scores and n-gram counts of the task pool."""
    from quadflow.tasks.cluster import load_assignments, load_neighbors
    from quadflow.tasks.featurize import load_ngrams
    from quadflow.tasks.score import load_scores
    from quadflow.tasks.scorers.dsir import DSIR

    with connect(refs.store, read_only=True) as con:
        meta = pl.from_arrow(query_sql(con, "bench_read_pool", {"key": refs.docs.key}).fetch_arrow_table())
        n = meta.height
        if n == 0 or not np.array_equal(meta["doc_idx"].to_numpy(), np.arange(n)):
            raise ValueError(f"ingest_docs {refs.docs.key}/pool is empty or not indexed 0..n-1")
        texts = pl.from_arrow(
            query_sql(con, "featurize_texts", {"key": refs.docs.key, "role": "pool"}).fetch_arrow_table()
            .column("text")).alias("text")
        clusters = load_assignments(con, refs.clusters.key)
        neighbors = load_neighbors(con, refs.clusters.key)
        (gamma,) = query_sql(con, "select_read_gamma", {"key": refs.clusters.key}).fetchone()
        (k,) = query_sql(con, "report_k", {"clusters_key": refs.clusters.key}).fetchone()
        scores = {name: load_scores(con, refs.scores.key, name) for name in (*SCORERS, COMBINED)}
        pool = load_ngrams(con, refs.features.key, "pool")
        target = load_ngrams(con, refs.features.key, "target")
        row = query_sql(con, "select_read_scorer_info", {"key": refs.scores.key, "scorer": "classifier"}).fetchone()
        keep = np.ones(n, dtype=bool)
        if refs.dedup:
            keep[query_sql(con, "select_read_dropped", {"keys": [r.key for r in refs.dedup], "lo": 0, "hi": None}).fetchnumpy()["doc_idx"]] = False
    log_weights = np.asarray(DSIR().fit(target, pool).log_weights(pool), dtype=np.float64)
    return PoolData(
        doc_id=meta["doc_id"].to_numpy(), ids=meta["source_id"].cast(pl.String).to_numpy(),
        sources=meta["source"].fill_null("(none)").to_numpy(),
        tokens=meta["n_tokens"].to_numpy().astype(np.int64), texts=texts, clusters=clusters.astype(np.int64),
        k=int(k), neighbors=neighbors, gamma=float(gamma), scores=scores, log_weights=log_weights,
        pool_ngrams=np.asarray(pool.sum(axis=0), dtype=np.float64).ravel(),
        target_ngrams=np.asarray(target.sum(axis=0), dtype=np.float64).ravel(),
        n_buckets=pool.shape[1], max_chars=settings.featurize.max_chars, ngrams=pool,
        classifier_params=None if row is None else json.loads(row[0]), keep=keep,
    )


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """One method run's chosen documents, in its order, and what the selector recorded."""

    method: MethodSpec
    seed: int | None
    ids: list[str]
    texts: list[str]
    sources: list[str]
    tokens: np.ndarray  # (docs,) int64
    doc_idx: np.ndarray  # (docs,) into the store's pool, -1 where the pool has no copy
    seconds: float
    frames: dict[str, pl.DataFrame] = field(default_factory=dict)  # run_selector output
    extra: dict[str, Any] = field(default_factory=dict)


def _from_store(method: MethodSpec, seed: int | None, data: PoolData, chosen: np.ndarray, seconds: float,
                frames: dict | None = None) -> Selection:
    chosen = np.asarray(chosen, dtype=np.int64)
    return Selection(method, seed, data.ids[chosen].tolist(), data.texts.gather(chosen).to_list(),
                     data.sources[chosen].tolist(), data.tokens[chosen], chosen, seconds, frames or {})


def run_method(method: MethodSpec, seed: int | None, data: PoolData, settings: Settings,
               domain: frozenset[str], probe: Callable[[], Any] | None = None) -> Selection:
    """Run one in-pipeline method (everything but the external package) on the task pool.

    `probe` makes a fresh on-demand probe scorer (`quadflow.tasks.select.Probe`) for a bandit whose
    scorer is not pool-wide (quad-influence); each run gets its own, so its cost is its own.
    """
    from quadflow.tasks.select import Novelty, fill_budget, quad_inputs, run_on_kept

    budget = settings.select.budget_tokens
    t0 = time.perf_counter()
    if method.kind in ("oracle", "oracle_clusters"):
        order = np.random.default_rng(seed).permutation(data.tokens.size)  # seeded order within ties
        if method.dedup and data.keep is not None:
            order = order[data.keep[order]]
        in_domain = np.isin(data.sources, list(domain))
        if method.kind == "oracle":  # in-domain documents first, then the rest
            rank = np.argsort(~in_domain[order], kind="stable")
        else:  # whole clusters, highest in-domain token share first (ties: lower cluster id)
            purity = (np.bincount(data.clusters, weights=data.tokens * in_domain, minlength=data.k)
                      / np.maximum(np.bincount(data.clusters, weights=data.tokens, minlength=data.k), 1))
            c = data.clusters[order]
            rank = np.lexsort((c, -purity[c]))  # stable: the seeded order within a cluster
        chosen = fill_budget(order[rank], data.tokens, budget)
        return _from_store(method, seed, data, chosen, time.perf_counter() - t0)
    kwargs: dict[str, Any] = {}
    clusters = data.clusters
    section = settings.select.model_copy(update={"selector": method.kind, **dict(method.select)})
    if method.kind == "topk":
        kwargs["scores"] = data.scores[method.scorer]
    if method.kind == "quad":
        if method.scorer is not None:
            section = section.model_copy(update={"probe_scorer": method.scorer})
        section, kwargs = quad_inputs(
            section, ran=lambda name: name in data.scores, pool_scores=lambda name: data.scores[name],
            classifier_params=lambda: data.classifier_params,
            novelty=lambda: Novelty(data.target_ngrams, data.pool_ngrams, lambda idx: data.ngrams[idx]))
        if section.probe_scorer == INFLUENCE:
            if probe is None:
                raise ValueError(f"method {method.name!r} probes on demand: give it a probe factory")
            kwargs["probe"] = probe()
        kwargs.update(neighbors=data.neighbors, gamma=data.gamma)
        if method.one_cluster:
            clusters = np.zeros_like(data.clusters)
            kwargs.update(neighbors=None, gamma=None)
    if method.kind == "dsir":
        kwargs["log_weights"] = data.log_weights
    keep = data.keep if method.dedup and data.keep is not None else np.ones(data.tokens.size, dtype=bool)
    frames = run_on_kept(keep, section, settings.seed if seed is None else seed, data.tokens, clusters, **kwargs)
    seconds = time.perf_counter() - t0
    return _from_store(method, seed, data, frames["selection"]["doc_idx"].to_numpy(), seconds, frames)


def package_selection(pool_path: Path, target_path: Path, budget: int, seed: int, config: BenchConfig,
                      cache: Path) -> tuple[Any, float, bool]:
    """(DsirResult, seconds, reused): the published DSIR's selection, from `cache` when its inputs match."""
    from importlib.metadata import version

    from benchmarks.eval.dsir_external import DsirResult, dsir_select

    key = {"pool": _sha256(pool_path), "target": _sha256(target_path), "budget": budget, "seed": seed,
           "num_proc": config.package_num_proc, "min_example_length": config.package_min_length,
           "package": version("data-selection")}
    if cache.exists() and not config.force:
        have = json.loads(cache.read_text())
        if have.get("key") == key:
            return DsirResult(**have["result"]), have["seconds"], True
    t0 = time.perf_counter()
    res = dsir_select(pool_path, target_path, budget, seed=seed, num_proc=config.package_num_proc,
                      min_example_length=config.package_min_length)
    seconds = time.perf_counter() - t0
    cache.write_text(json.dumps({"key": key, "seconds": seconds, "result": asdict(res)}) + "\n")
    return res, seconds, False


def run_package(method: MethodSpec, seed: int, data: PoolData, pool_path: Path, target_path: Path, budget: int,
                config: BenchConfig, cache: Path) -> Selection:
    """The published DSIR package on the same pool file and target; its picks located in the store's pool."""
    res, seconds, reused = package_selection(pool_path, target_path, budget, seed, config, cache)
    idx = np.asarray([data.position(x) for x in res.ids], dtype=np.int64)
    texts: list[str | None] = [data.texts[int(i)] if i >= 0 else None for i in idx]
    sources: list[str | None] = [data.sources[int(i)] if i >= 0 else None for i in idx]
    missing = {x: j for j, x in enumerate(res.ids) if idx[j] < 0}  # exact copies ingest dropped
    if missing:
        for line in iter_lines(pool_path):
            rec = json.loads(line)
            j = missing.get(str(rec.get("id")))
            if j is not None:
                texts[j] = rec.get("text") or ""
                sources[j] = rec.get("source") if isinstance(rec.get("source"), str) else "(none)"
        idx = data.locate(res.ids, texts)
    frame = pl.DataFrame({"text": texts}, schema={"text": pl.String})
    tokens = frame.select(count_tokens_expr())["text"].to_numpy().astype(np.int64)
    return Selection(method, seed, list(res.ids), texts, sources, tokens, idx, seconds,
                     extra={"package_seconds": res.seconds, "package_candidates": res.candidates,
                            "package_version": res.package_version, "package_reused": reused})


def influence_settings(settings: Settings, overrides: dict) -> InfluenceSettings:
    """score.influence of the run with the benchmark's overrides on top (validated as the pipeline would)."""
    return InfluenceSettings.model_validate({**settings.score.influence.model_dump(), **overrides})


def fit_influence(refs: PipelineRefs, settings: Settings, overrides: dict, path: Path, force: bool = False,
                  log: Callable[[str], None] = print) -> tuple[InfluenceSettings, dict, bool]:
    """quad-influence's fitted scorer, fitted exactly as the score stage fits it, saved at `path`.

    Reused while the pool partition, the settings and the seed are unchanged and the file is the
    one recorded in the sidecar `path`.json. Returns the settings, the score_info-style params and
    whether they were reused.
    """
    from quadflow.tasks.score import ensure_influence_state
    from quadflow.tasks.scorers.influence import VERSION

    inf = influence_settings(settings, overrides)
    sidecar = path.with_name(path.name + ".json")
    want = {"docs": refs.docs.key, "docs_fingerprint": refs.docs.fingerprint, "seed": settings.seed,
            "settings": inf.model_dump(mode="json"), "version": VERSION}
    reuse = None
    if sidecar.exists() and not force:
        have = json.loads(sidecar.read_text())
        reuse = have.get("params") if have.get("key") == want else None
    with connect(refs.store, read_only=True) as con:
        counts = dict(query_sql(con, "select_count_docs", {"key": refs.docs.key}).fetchall())
        params = ensure_influence_state(con, inf, refs.docs.key, int(counts.get("pool", 0)),
                                        int(counts.get("target", 0)), settings.seed, path, reuse=reuse)
    if params is not reuse:
        sidecar.write_text(json.dumps({"key": want, "params": params}, default=str) + "\n")
        log(f"  influence: proxy trained and scorer fitted in {params['seconds']:.1f} s on {params['device']} "
            f"({params['proxy_params']:,}-parameter proxy)")
    else:
        log(f"  influence: reusing the fitted scorer {path}")
    return inf, params, params is reuse


def influence_probe_factory(inf: InfluenceSettings, params: dict, path: Path, data: PoolData) -> Callable[[], Any]:
    """Fresh `Probe`s over one loaded scorer: each scores a round's probed texts (cut as the select stage cuts them)."""
    from quadflow.tasks.scorers.influence.fitted import device_of, load_fitted, torch_threads
    from quadflow.tasks.select import Probe

    scorer, _ = load_fitted(path, device=device_of(inf))
    max_chars = int(params["max_chars"])

    def score_fn(idx: np.ndarray) -> np.ndarray:
        texts = data.texts.gather(idx).str.slice(0, max_chars).to_list()
        with torch_threads(inf.threads):
            return scorer.score(texts, progress=False)

    return lambda: Probe(score_fn, data.tokens.size)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate(sel: Selection, data: PoolData, heldout: list[str], vocab: Vocab, domain: frozenset[str],
             budget: int) -> dict[str, Any]:
    """Quality, closeness to the target, diversity and mix of one selection (one results row)."""
    from quadflow.tasks.featurize import hashed_ngrams

    t0 = time.perf_counter()
    lm = evaluate_selection(sel.texts, heldout, vocab)
    sel_ngrams = np.asarray(hashed_ngrams(sel.texts, data.n_buckets, data.max_chars).sum(axis=0)).ravel()
    kl_raw = kl_divergence(data.target_ngrams, data.pool_ngrams)
    kl_sel = kl_divergence(data.target_ngrams, sel_ngrams)
    per_source: dict[str, int] = {}
    for s, t in zip(sel.sources, sel.tokens.tolist()):
        per_source[s] = per_source.get(s, 0) + t
    total = int(sel.tokens.sum())
    mix = source_mix(list(per_source), list(per_source.values()), top=3)
    located = sel.doc_idx[sel.doc_idx >= 0]
    row = {
        "method": sel.method.name, "kind": sel.method.kind, "scorer": sel.method.scorer,
        "reference": sel.method.reference, "seed": sel.seed,
        "docs": len(sel.ids), "tokens": total, "budget": budget, "budget_deviation": (total - budget) / budget,
        "perplexity": lm["perplexity"], "cross_entropy": lm["cross_entropy"],
        "heldout_unk_rate": lm["heldout_unk_rate"], "train_events": lm["train_events"],
        "kl_target_raw": kl_raw, "kl_target_selected": kl_sel, "kl_reduction": kl_raw - kl_sel,
        "domain_share": (sum(t for s, t in per_source.items() if s in domain) / total) if domain and total else None,
        "clusters_covered": int(np.unique(data.clusters[located]).size),
        "cluster_coverage": cluster_coverage(data.clusters[located], data.k),
        "sources_covered": len(per_source), "source_entropy": entropy(list(per_source.values())) + 0.0,
        "source_mix": "; ".join(f"{s} {share:.0%}" for s, share in mix.items()),
        "select_seconds": round(sel.seconds, 3), "eval_seconds": round(time.perf_counter() - t0, 3),
    }
    if sel.method.kind == "quad":
        row |= bandit_diagnostics(sel, data, domain)
    if sel.extra:
        row["package_seconds"] = json.dumps(sel.extra.get("package_seconds"))
        row["package_candidates"] = sel.extra.get("package_candidates")
        row["package_reused"] = sel.extra.get("package_reused")
    return row


def bandit_diagnostics(sel: Selection, data: PoolData, domain: frozenset[str]) -> dict[str, Any]:
    """Why the bandit chose what it did: acceptance, exploration, probe signal vs noise, the fill phase."""
    f = sel.frames
    info = dict(zip(f["info"]["name"].to_list(), f["info"]["value"].to_list()))
    rounds, probes, chosen = f["rounds"], f["probes"], f["selection"]
    pulls = rounds.height
    fill = chosen.filter(pl.col("reason") == "quad_fill")["doc_idx"].to_numpy()
    block = chosen.filter(pl.col("reason") != "quad_fill")["doc_idx"].to_numpy()  # accepted in a round
    tokens = int(data.tokens[chosen["doc_idx"].to_numpy()].sum())
    # Probe noise vs cluster signal: the spread of probe scores inside one pulled block, against the
    # spread of block means across pulls. A block mean of m probes has noise within_sd / sqrt(m).
    pulled = probes.filter(pl.col("round") > 0)
    within = pulled.group_by("round", "cluster").agg(pl.col("score").std()).get_column("score").drop_nulls()
    m = max(int(pulled.group_by("round", "cluster").len()["len"].max() or 1), 1) if pulled.height else 1
    means = rounds["mean_probe"].to_numpy()
    between = float(np.std(means)) if means.size > 1 else 0.0
    within_sd = float(within.mean()) if within.len() else 0.0
    block_tokens = int(data.tokens[block].sum()) if block.size else 0
    in_domain_block = int(data.tokens[block][np.isin(data.sources[block], list(domain))].sum()) if block.size else 0
    # the scorer's spread: over the pool for a pool-wide score, over the probed documents for influence
    scores = data.scores[sel.method.scorer] if sel.method.scorer in data.scores else probes["score"].to_numpy()
    q10, q25, q75, q90 = np.quantile(scores, [0.1, 0.25, 0.75, 0.9])
    return {
        "rounds": int(info["rounds"] or 0), "pulls": pulls, "stop": info.get("stop"),
        "accept_rate": float(rounds["accepted"].mean()) if pulls else None,
        "clusters_pulled": int(rounds["cluster"].n_unique()) if pulls else 0,
        "clusters_explored": (rounds["cluster"].n_unique() / data.k) if pulls else 0.0,
        "clusters_accepted": int(rounds.filter(pl.col("accepted"))["cluster"].n_unique()) if pulls else 0,
        "tau": float(info["tau"]), "alpha": float(info["alpha"]), "block_docs": None if info["block_docs"] is None else int(info["block_docs"]),
        "docs_probed": int(info["docs_probed"]),
        "docs_scored": int(info["docs_scored"]), "probe_seconds": float(info["probe_seconds"]),
        "probe_within_sd": within_sd, "probe_between_sd": between,
        "probe_snr": between / (within_sd / math.sqrt(m)) if within_sd > 0 else None,
        "score_iqr": float(q75 - q25), "score_p90_p10": float(q90 - q10),
        "fill_share": float(data.tokens[fill].sum() / tokens) if tokens and fill.size else 0.0,
        **{f"{tier}_share": float(data.tokens[chosen.filter(pl.col("reason") == f"quad_{tier}")["doc_idx"].to_numpy()]
                                  .sum() / tokens) if tokens else 0.0
           for tier in ("target_kind", "likely_target_kind", "related")},
        "block_domain_share": (in_domain_block / block_tokens) if block_tokens and domain else None,
    }


# --------------------------------------------------------------------------------------------
# One task
# --------------------------------------------------------------------------------------------


def cluster_diagnostics(data: PoolData, in_domain: np.ndarray) -> dict[str, Any]:
    """How the clusters carve up the pool and the domain: the ceiling of any whole-cluster selector."""
    tok = np.bincount(data.clusters, weights=data.tokens, minlength=data.k)  # (k,) tokens per cluster
    dom = np.bincount(data.clusters, weights=data.tokens * in_domain, minlength=data.k)
    out = {"largest_cluster_token_share": float(tok.max() / tok.sum()),
           "median_cluster_tokens": float(np.median(tok[tok > 0]))}
    if dom.sum() > 0:
        top = int(np.argmax(dom))
        by_dom = np.sort(dom)[::-1]
        out |= {"domain_top_cluster": top, "domain_top_cluster_share": float(dom[top] / dom.sum()),
                "domain_top_cluster_purity": float(dom[top] / tok[top]),
                "domain_top_cluster_pool_share": float(tok[top] / tok.sum()),
                "clusters_for_90pct_domain": int(np.searchsorted(np.cumsum(by_dom), 0.9 * dom.sum()) + 1)}
    return out


def cached_vocab(task: Task, config: BenchConfig, work: Path) -> Vocab:
    """The task's one vocabulary (`task_vocab`), kept on disk next to the store while the task is unchanged."""
    path = work / "vocab.json"
    want = {"files": task.meta["files"], "size": config.vocab_size, "pool_tokens": config.vocab_pool_tokens}
    if path.exists():
        have = json.loads(path.read_text())
        if have.get("key") == want:
            return Vocab(have["words"])
    vocab = task_vocab(task, size=config.vocab_size, pool_tokens=config.vocab_pool_tokens)
    path.write_text(json.dumps({"key": want, "words": list(vocab.words[3:])}))
    return vocab


@dataclass
class TaskResult:
    """Everything one task contributes to the outputs."""

    name: str
    rows: list[dict]
    pipeline: list[dict]
    info: dict
    protocol: str  # "ok" or the ProtocolError's message


def method_plan(config: BenchConfig) -> tuple[list[MethodSpec], dict[str, str]]:
    """The methods this run evaluates, and those left out with the reason (reasons are data)."""
    if config.methods is not None:
        unknown = sorted(set(config.methods) - set(METHOD_NAMES))
        if unknown:
            raise ValueError(f"methods {unknown!r} are unknown; choose from {', '.join(METHOD_NAMES)}")
    run, skipped = [], {}
    for m in METHODS:
        if config.methods is not None and m.name not in config.methods:
            continue
        if m.kind == "package" and not config.package:
            skipped[m.name] = "--no-package"
        elif m.scorer == INFLUENCE and not influence_available():
            skipped[m.name] = "torch is not installed (pip install -e '.[influence]')"
        else:
            run.append(m)
    return run, skipped


def transformer_config(config: BenchConfig, plan: TransformerPlan) -> tuple[str, TransformerLMConfig] | None:
    """The second opinion's preset name and config for this run's device (None when it does not run)."""
    if not plan.run:
        return None
    name = config.transformer_preset or ("small" if plan.device == "cuda" else "tiny")
    return name, preset(name, train_tokens=config.transformer_tokens)


def run_task(task: Task, config: BenchConfig, log: Callable[[str], None] = print,
             transformer: tuple[TransformerPlan, TransformerLMConfig | None] | None = None) -> TaskResult:
    """Pipeline stages once, then every method at one budget, each evaluated; protocol checked last.

    `transformer`: where the second opinion runs and its config (None or a plan that does not run: skipped).
    """
    work = config.out / task.name
    work.mkdir(parents=True, exist_ok=True)
    t_task = time.perf_counter()
    if config.mode.pool_docs is not None:
        pool_path = work / f"pool-{config.mode.pool_docs}.jsonl.zst"
        sample = subsample_jsonl(task.pool_path, pool_path, config.mode.pool_docs)
        log(f"  pool: {sample['kept']:,} of {sample['source_docs']:,} documents (seeded hash subsample)")
        label = f"{config.mode.pool_docs}docs"
    else:
        pool_path, label = task.pool_path, "full"
    store = work / f"quadflow-{label}.duckdb"
    settings = pipeline_settings(store, pool_path, task.target_path, 1, config.pipeline)
    refs, timings = run_pipeline(settings, work / f"pipeline-{label}.json", config.force, log)
    data = load_pool_data(refs, settings)
    budget = config.budget_tokens or int(round(DEFAULT_BUDGET_FRACTION * int(data.tokens.sum())))
    settings = pipeline_settings(store, pool_path, task.target_path, budget, config.pipeline)
    spec = task.meta["spec"]
    domain = frozenset(spec["values"]) if spec.get("field", "source") == "source" else frozenset()
    vocab = cached_vocab(task, config, work)
    heldout = [r.get("text") or "" for r in task.heldout()]
    held_ids = task.heldout_ids()
    in_domain = np.isin(data.sources, list(domain))
    info = cluster_diagnostics(data, in_domain) | {
        "pool_docs": int(data.tokens.size), "pool_tokens": int(data.tokens.sum()),
        "pool_domain_docs": int(in_domain.sum()), "pool_domain_tokens": int(data.tokens[in_domain].sum()),
        "budget": budget, "k": data.k, "gamma": data.gamma, "heldout_docs": len(heldout),
        "target_docs": task.meta["counts"]["target_docs"], "vocab": len(vocab), "pool_file": str(pool_path),
    }
    log(f"  pool {info['pool_docs']:,} docs / {info['pool_tokens']:,} tokens "
        f"({info['pool_domain_tokens']:,} in-domain), budget {budget:,}, k {data.k}")

    methods, skipped = method_plan(config)
    info["skipped_methods"] = skipped
    probe = None
    if any(m.scorer == INFLUENCE for m in methods):
        state = work / f"influence-{label}.pt"
        inf, params, reused = fit_influence(refs, settings, config.influence, state, config.force, log)
        probe = influence_probe_factory(inf, params, state, data)
        info["influence"] = {k: params.get(k) for k in ("device", "threads", "proxy_params", "proxy_seconds",
                                                         "fit_seconds", "seconds", "proxy_train_loss")}
        info["influence"]["reused"] = reused
        default = InfluenceSettings().model_dump(mode="json")
        info["influence"]["non_default_settings"] = {k: v for k, v in inf.model_dump(mode="json").items()
                                                     if v != default[k]}
    plan, tcfg = transformer if transformer is not None else (None, None)
    evalset = encode_eval(heldout, tcfg) if plan is not None and plan.run else None

    rows, ids, tokens = [], {}, {}
    for method in methods:
        seeds = range(config.seeds) if method.seeded else [0 if method.kind == "package" else None]
        for seed in seeds:
            if method.kind == "package":
                sel = run_package(method, seed, data, pool_path, task.target_path, budget, config,
                                  work / f"dsir-package-{label}-seed{seed}.json")
            else:
                sel = run_method(method, seed, data, settings, domain, probe)
            row = {"task": task.name, "mode": config.mode.name} | evaluate(sel, data, heldout, vocab, domain, budget)
            second = ""
            if evalset is not None:
                row |= evaluate_transformer(sel.texts, evalset, tcfg, config.transformer_seed, plan.device)
                second = (f"  transformer ppl {row['ppl_transformer']:.3f}/byte "
                          f"({row['transformer_seconds']:.1f} s)")
            else:
                row |= dict.fromkeys(TRANSFORMER_COLUMNS)
            rows.append(row)
            run = f"{method.name}" + ("" if seed is None else f"#{seed}")
            ids[run], tokens[run] = sel.ids, int(sel.tokens.sum())
            log(f"  {run:<22} ppl {row['perplexity']:9.2f}  KL red {row['kl_reduction']:+.4f}  "
                f"domain {_pct(row['domain_share'])}  {row['tokens']:,} tok  "
                f"({row['select_seconds']:.1f} s + eval {row['eval_seconds']:.1f} s){second}")
            del sel
    try:
        check_protocol(ids, held_ids, tokens, budget)
        protocol = "ok"
    except ProtocolError as e:
        protocol = str(e)
    info["seconds"] = round(time.perf_counter() - t_task, 1)
    log(f"  protocol: {protocol}; {info['seconds']:.0f} s")
    return TaskResult(task.name, rows, timings, info, protocol)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"


def _num(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def summarize(rows: list[dict]) -> pl.DataFrame:
    """One row per (task, method): mean and spread over seeds of every number that matters."""
    frame = pl.DataFrame(rows, infer_schema_length=None)
    order = {name: i for i, name in enumerate(METHOD_NAMES)}
    diag = [c for c in ("accept_rate", "clusters_explored", "rounds", "fill_share", "probe_snr", "target_kind_share",
                        "likely_target_kind_share", "related_share",
                        "block_domain_share", "tau", "probe_within_sd", "probe_between_sd", "score_iqr",
                        "docs_scored", "probe_seconds", "transformer_seconds")
            if c in frame.columns]
    second = [pl.col("ppl_transformer").cast(pl.Float64).mean().alias("ppl_transformer"),
              pl.col("ppl_transformer").cast(pl.Float64).std().alias("ppl_transformer_sd"),
              pl.col("ppl_transformer_word").cast(pl.Float64).mean().alias("ppl_transformer_word")
              ] if "ppl_transformer" in frame.columns else []
    aggs = [
        pl.len().alias("runs"),
        pl.col("perplexity").mean().alias("ppl"), pl.col("perplexity").std().alias("ppl_sd"),
        pl.col("perplexity").min().alias("ppl_min"), pl.col("perplexity").max().alias("ppl_max"),
        pl.col("kl_reduction").mean().alias("kl_red"), pl.col("kl_reduction").std().alias("kl_red_sd"),
        pl.col("domain_share").cast(pl.Float64).mean().alias("domain_share"),
        pl.col("cluster_coverage").mean(), pl.col("clusters_covered").mean(),
        pl.col("source_entropy").mean(), pl.col("sources_covered").mean(),
        pl.col("tokens").mean(), pl.col("docs").mean(), pl.col("budget_deviation").abs().max().alias("max_budget_dev"),
        pl.col("source_mix").first(), pl.col("select_seconds").mean(), pl.col("reference").first(),
        *(pl.col(c).cast(pl.Float64).mean() for c in diag), *second,
    ]
    return (frame.group_by("task", "method", maintain_order=True).agg(aggs)
            .with_columns(pl.col("method").replace_strict(order, default=len(order)).alias("_o"))
            .sort("task", "_o").drop("_o"))


def verdicts(summary: pl.DataFrame) -> list[dict]:
    """Per task: each Quad variant's held-out perplexity against random and the best per-document selector."""
    out = []
    for task in summary["task"].unique(maintain_order=True).to_list():
        s = summary.filter(pl.col("task") == task)
        ppl = dict(zip(s["method"].to_list(), s["ppl"].to_list()))
        per_doc = {m: ppl[m] for m in PER_DOCUMENT if m in ppl}
        best = min(per_doc, key=per_doc.get) if per_doc else None
        for method in (m for m in METHOD_NAMES if m.startswith("quad") and m in ppl):
            row = {"task": task, "method": method, "ppl": ppl[method], "ppl_random": ppl.get("random"),
                   "best_per_document": best, "ppl_best_per_document": per_doc.get(best),
                   "best_overall": min((v, m) for m, v in ppl.items()
                                       if not s.filter(pl.col("method") == m)["reference"][0])[1]}
            # > 0: quad's held-out perplexity is that much lower than the best per-document selector's
            row["gain_vs_best_per_document"] = (1 - ppl[method] / per_doc[best]) if best else None
            out.append(row)
    return out


def judges_agree(task_summary: pl.DataFrame) -> float | None:
    """Spearman rank correlation of the trigram's and the transformer's perplexities over one task's methods."""
    from scipy.stats import spearmanr

    both = task_summary.select("ppl", "ppl_transformer").drop_nulls()
    if both.height < 3:
        return None
    rho = spearmanr(both["ppl"].to_numpy(), both["ppl_transformer"].to_numpy()).statistic
    return None if rho is None or math.isnan(rho) else float(rho)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """Cores and memory of this machine, in words."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    return f"{os.cpu_count()} cores / {mem:.0f} GB, {platform.machine()}, Python {platform.python_version()}"


def render_markdown(results: list[TaskResult], summary: pl.DataFrame, meta: dict) -> str:
    """results.md: the run's header, per-task method tables, the verdict and the bandit diagnostics."""
    lines = [
        f"# Selection benchmark ({meta['mode']})", "",
        f"- date: {meta['date']}", f"- command: `{meta['command']}`", f"- commit: {meta['commit']}",
        f"- machine: {meta['machine']}; load average {meta['load_start']} at start, {meta['load_end']} at end",
        f"- seeds per random method: {meta['seeds']}; wall time {meta['seconds']:.0f} s",
        f"- second opinion (tiny transformer): {meta['transformer']['text']}", "",
        "Perplexity: held-out target perplexity of a Kneser-Ney trigram model trained on the selection only "
        "(lower is better; one vocabulary per task). KL red.: KL(target||pool) - KL(target||selection) on hashed "
        "1-2-grams, in nats (higher is better). Domain: share of selected tokens from the target's own source. "
        "Mean +- sd over seeds where a method is random.", "",
    ]
    second = "ppl_transformer" in summary.columns and summary["ppl_transformer"].drop_nulls().len() > 0
    if second:
        lines += ["Transformer: held-out perplexity per UTF-8 byte of the second-opinion transformer trained on the "
                  "selection only (lower is better); rho: Spearman rank correlation of the two perplexities over "
                  "a task's methods (1: both judges rank the methods alike).", ""]
    for res in results:
        i = res.info
        lines += [f"## {res.name}", "",
                  f"Pool {i['pool_docs']:,} docs / {i['pool_tokens']:,} tokens, of which {i['pool_domain_tokens']:,} "
                  f"in-domain ({i['pool_domain_docs']:,} docs); budget {i['budget']:,} tokens; k = {i['k']}; "
                  f"held-out {i['heldout_docs']} docs; protocol: {'ok' if res.protocol == 'ok' else 'VIOLATED'}.", ""]
        if "domain_top_cluster" in i:
            lines += [f"Clusters: the largest holds {i['largest_cluster_token_share']:.0%} of the pool's tokens "
                      f"(median cluster {i['median_cluster_tokens']:,.0f} tokens). {i['domain_top_cluster_share']:.0%} "
                      f"of the in-domain tokens sit in one cluster ({i['domain_top_cluster']}), which is "
                      f"{i['domain_top_cluster_purity']:.0%} in-domain and {i['domain_top_cluster_pool_share']:.0%} of "
                      f"the pool; {i['clusters_for_90pct_domain']} clusters hold 90% of the in-domain tokens.", ""]
        if "influence" in i:
            f = i["influence"]
            lines += [f"quad-influence: a {f['proxy_params']:,}-parameter proxy trained in "
                      f"{_num(f['proxy_seconds'], 1)} s and the scorer fitted in {_num(f['fit_seconds'], 1)} s on "
                      f"{f['device']} ({f['threads'] or 'default'} torch threads; settings other than "
                      f"score.influence's defaults: {json.dumps(f['non_default_settings'])}), once per task pool"
                      + (" (by an earlier run; reused here)." if f.get("reused") else "."), ""]
        if i.get("skipped_methods"):
            lines += ["Not run: " + "; ".join(f"{m} ({why})" for m, why in i["skipped_methods"].items()) + ".", ""]
        s = summary.filter(pl.col("task") == res.name)
        rows = []
        for r in s.iter_rows(named=True):
            sd = f" +- {_num(r['ppl_sd'])}" if r["runs"] > 1 and r["ppl_sd"] is not None else ""
            name = r["method"] + (" (reference)" if r["reference"] else "")
            row = [name, r["runs"], f"{_num(r['ppl'])}{sd}"]
            if second:
                tsd = r.get("ppl_transformer_sd")
                spread = f" +- {_num(tsd, 3)}" if r["runs"] > 1 and tsd is not None else ""
                row.append(_num(r["ppl_transformer"], 3) + spread)
            rows.append(row + [
                _num(r["kl_red"], 4) + (f" +- {_num(r['kl_red_sd'], 4)}" if r["runs"] > 1 and r["kl_red_sd"] is not None else ""),
                _pct(r["domain_share"]), f"{_num(r['clusters_covered'], 0)} ({_pct(r['cluster_coverage'])})",
                _num(r["source_entropy"]), r["source_mix"]])
        lines += _table(["method", "runs", "perplexity", *(["transformer"] if second else []), "KL red.", "domain",
                         "clusters covered", "source entropy", "top sources (token share)"], rows) + [""]
        if second:
            rho = judges_agree(s)
            lines += [f"Trigram vs transformer: rho = {_num(rho)} over {s.height} methods.", ""]
        if res.protocol != "ok":
            lines += ["```", res.protocol, "```", ""]
    lines += ["## Does quad beat the per-document selectors?", "",
              "Held-out perplexity of each Quad variant against random and the best per-document selector of the "
              f"task (of {', '.join(PER_DOCUMENT)}); gain: how much lower quad's perplexity is (positive: better).",
              ""]
    vrows = [[v["task"], v["method"], _num(v["ppl"]), _num(v["ppl_random"]), v["best_per_document"] or "-",
              _num(v["ppl_best_per_document"]), "-" if v["gain_vs_best_per_document"] is None else f"{v['gain_vs_best_per_document']:+.1%}",
              v["best_overall"]]
             for v in verdicts(summary)]
    lines += _table(["task", "method", "ppl", "random", "best per-document", "its ppl", "gain", "best method"],
                    vrows) + [""]
    lines += ["## Bandit diagnostics", "",
              "accept: share of pulled blocks accepted; explored: clusters pulled at least once / k; fill: share "
              "of the budget taken after the bandit stopped (not chosen by probes); target kind / likely kind / "
              "related: share of the budget each candidate tier of ranked blocks gave; domain (blocks): in-domain "
              "share of accepted blocks; probe SNR: sd of block means across pulls / (sd of probes within a "
              "block / sqrt(m)), below ~2 the probes cannot tell clusters apart; score IQR: of the pool's scores "
              "(of the probed documents' for influence); docs scored: documents the probe scorer computed a score "
              "for (the whole pool for a pool-wide score), in probe s seconds.", ""]
    drows = []
    for r in summary.filter(pl.col("method").str.starts_with("quad")).iter_rows(named=True):
        drows.append([r["task"], r["method"], _pct(r.get("accept_rate")), _pct(r.get("clusters_explored")),
                      _num(r.get("rounds"), 0), _pct(r.get("fill_share")), _pct(r.get("block_domain_share")),
                      _pct(r.get("target_kind_share")), _pct(r.get("likely_target_kind_share")),
                      _pct(r.get("related_share")), _num(r.get("probe_snr")), _num(r.get("tau"), 3),
                      _num(r.get("score_iqr"), 3), _num(r.get("docs_scored"), 0), _num(r.get("probe_seconds"), 1)])
    lines += _table(["task", "bandit", "accept", "explored", "rounds", "fill", "domain (blocks)", "target kind",
                     "likely kind", "related", "probe SNR", "tau", "score IQR", "docs scored", "probe s"],
                    drows) + [""]
    lines += ["## Pipeline stages (once per task pool)", ""]
    prow = []
    for res in results:
        for t in res.pipeline:
            prow.append([res.name, t["stage"], _num(t["seconds"], 1), _num(t.get("cpu_seconds"), 1),
                         _num(t["peak_rss_mb"], 0)])
    lines += _table(["task", "stage", "wall s", "CPU s", "peak RSS MB"], prow) + [""]
    return "\n".join(lines)


def plot_metric(summary: pl.DataFrame, column: str, sd: str | None, label: str, path: Path) -> None:
    """One panel per task: the metric by method (mean, bars = min..max over seeds), random as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    tasks = summary["task"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        s = summary.filter(pl.col("task") == task)
        methods = s["method"].to_list()
        y = np.arange(len(methods))
        vals = s[column].to_numpy().astype(float)
        colors = ["#c44e52" if m.startswith("quad") else "#8c8c8c" if m.startswith("oracle") else
                  "#dd8452" if "dsir" in m else "#4c72b0" for m in methods]
        xerr = None
        if column == "ppl":
            lo, hi = s["ppl_min"].to_numpy().astype(float), s["ppl_max"].to_numpy().astype(float)
            xerr = np.clip(np.vstack([vals - lo, hi - vals]), 0.0, None)  # a mean of equal floats can miss them by an ulp
        elif sd is not None:
            xerr = np.nan_to_num(s[sd].to_numpy().astype(float))
        ax.barh(y, vals, xerr=xerr, color=colors, capsize=2)
        if "random" in methods:
            ax.axvline(vals[methods.index("random")], color="k", ls="--", lw=0.8)
        ax.set_yticks(y, methods, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(task, fontsize=10)
        ax.set_xlabel(label, fontsize=9)
        if column == "ppl":  # log scale: perplexities of one panel span more than a decade
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlim(0.8 * np.nanmin(vals - xerr[0]), 1.25 * np.nanmax(vals + xerr[1]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class BenchResult:
    """What a run wrote and whether every task kept the protocol."""

    results: list[TaskResult]
    summary: pl.DataFrame
    markdown: str
    out: Path

    @property
    def protocol_ok(self) -> bool:
        return all(r.protocol == "ok" for r in self.results)


def run_bench(config: BenchConfig, command: str = "", log: Callable[[str], None] = print) -> BenchResult:
    """Run every task of the config and write results.csv, results.md and the plots to config.out."""
    start = time.perf_counter()
    load_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    method_plan(config)  # unknown method names fail before any work
    plan = plan_transformer(config.transformer)
    chosen = transformer_config(config, plan)
    transformer_meta = {"mode": config.transformer, "ran": plan.run, "device": plan.device, "reason": plan.reason,
                        "config": describe(chosen[1], chosen[0]) if chosen else None,
                        "seed": config.transformer_seed if chosen else None}
    transformer_meta["text"] = describe_transformer(transformer_meta)
    log(f"second opinion (tiny transformer): {transformer_meta['text']}")
    config.out.mkdir(parents=True, exist_ok=True)
    missing = [t for t in config.tasks if not (config.tasks_dir / t / "task.json").exists()]
    if missing:
        unknown = [t for t in missing if t not in TASKS]
        if unknown:
            raise ValueError(f"tasks {unknown!r} are not built in {config.tasks_dir} and not built-in tasks "
                             f"({', '.join(sorted(TASKS))}); build them with benchmarks/build_tasks.py")
        log(f"building tasks {missing} from {config.source}")
        build_tasks(config.source, config.tasks_dir, [TASKS[t] for t in missing])
    results = []
    for name in config.tasks:
        log(f"{name} ({config.mode.name})")
        results.append(run_task(load_task(config.tasks_dir / name), config, log,
                                (plan, chosen[1] if chosen else None)))
    rows = [r for res in results for r in res.rows]
    summary = summarize(rows)
    meta = {"mode": config.mode.name, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command or "benchmarks.bench.run_bench(...)", "commit": _commit(), "machine": machine(),
            "load_start": load_start, "load_end": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "seeds": config.seeds, "seconds": time.perf_counter() - start, "transformer": transformer_meta}
    markdown = render_markdown(results, summary, meta)
    pl.DataFrame(rows, infer_schema_length=None).write_csv(config.out / "results.csv")
    (config.out / "results.md").write_text(markdown + "\n")
    (config.out / "results.json").write_text(json.dumps(
        {"meta": meta, "tasks": {r.name: {"info": r.info, "pipeline": r.pipeline, "protocol": r.protocol}
                                 for r in results}}, indent=2, default=str) + "\n")
    plot_metric(summary, "ppl", None, "held-out perplexity (lower is better)", config.out / "perplexity.png")
    plot_metric(summary, "kl_red", "kl_red_sd", "KL reduction, nats (higher is better)", config.out / "kl_reduction.png")
    if plan.run:
        plot_metric(summary, "ppl_transformer", "ppl_transformer_sd",
                    "transformer ppl per byte (lower is better)", config.out / "ppl_transformer.png")
    return BenchResult(results, summary, markdown, config.out)


def describe_transformer(meta: dict) -> str:
    """One line for logs and results.md: where the second opinion ran and with what, or why it was skipped."""
    if not meta["ran"]:
        return meta["reason"]
    c = meta["config"]
    unit = "byte" if c["tokenizer"] == "bytes" else "hashed word"
    return (f"{meta['reason']}; preset {c['preset']}: {c['n_layers']} x {c['d_model']}, {c['params']:,} parameters, "
            f"{c['tokenizer']} tokenizer, {c['seq_len']}-{unit} context, "
            f"{c['steps'] * c['batch_size'] * c['seq_len']:,} training {unit}s per selection ({c['steps']} steps x {c['batch_size']} windows), seed {meta['seed']}, "
            f"{c['threads'] or 'default'} torch threads; held-out perplexity per {unit}"
            + (f" on a seeded sample of at most {c['max_eval_tokens']:,} held-out {unit}s "
               f"({c['seq_len']}-{unit} chunks)" if c["max_eval_tokens"] else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="quick")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="TASK",
                    help=f"task names (built-in: {', '.join(TASKS)}; others must be built in --tasks-dir)")
    ap.add_argument("--seeds", type=int, help="seeds per random method (quick: 1, full: 3)")
    ap.add_argument("--budget-tokens", type=int,
                    help=f"token budget of every method (default: {DEFAULT_BUDGET_FRACTION * 100:.0f}%% of the pool's tokens)")
    ap.add_argument("--pool-docs", type=int, help="subsample each pool to this many documents (quick: 30000)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--tasks-dir", default=str(DEFAULT_TASKS_DIR))
    ap.add_argument("--source", default=str(DEFAULT_SOURCE), help="JSONL the built-in tasks are cut from")
    ap.add_argument("--no-package", action="store_true", help="skip the published DSIR package")
    ap.add_argument("--package-num-proc", type=int, default=2)
    ap.add_argument("--config", help="YAML of pipeline settings (featurize, cluster, score, select) to override")
    ap.add_argument("--force", action="store_true", help="recompute the pipeline stages even when reusable")
    ap.add_argument("--methods", nargs="+", metavar="METHOD", help=f"only these methods ({', '.join(METHOD_NAMES)})")
    ap.add_argument("--no-influence", action="store_true", help="skip quad-influence (the influence probe scorer)")
    ap.add_argument("--influence", default="{}",
                    help=f"JSON overrides of score.influence for quad-influence (default {json.dumps(BENCH_INFLUENCE)})")
    ap.add_argument("--transformer", choices=("auto", "on", "off"), default="auto",
                    help="tiny-transformer second opinion: auto = only with a GPU, on = on any device, off")
    ap.add_argument("--transformer-preset", choices=sorted(PRESETS),
                    help="its size (default: small on a GPU, tiny on the CPU)")
    ap.add_argument("--transformer-tokens", type=int, help="its training tokens per selection (default: the preset's)")
    args = ap.parse_args(argv)

    os.environ.setdefault("TQDM_DISABLE", "1")  # the DSIR package's progress bars, in its workers too
    mode = MODES[args.mode]
    if args.pool_docs is not None:
        mode = replace(mode, pool_docs=args.pool_docs)
    seeds = args.seeds if args.seeds is not None else mode.seeds
    if seeds < 1:
        ap.error(f"--seeds {seeds}: at least 1")
    pipeline = {}
    if args.config:
        from quadflow.settings import load_yaml

        pipeline = {k: v for k, v in load_yaml(args.config).items() if k in ("featurize", "cluster", "score", "select")}
    methods = tuple(args.methods) if args.methods else None
    if args.no_influence:
        methods = tuple(m for m in (methods or METHOD_NAMES) if m != f"quad-{INFLUENCE}")
    try:
        influence = {**BENCH_INFLUENCE, **json.loads(args.influence)}
    except json.JSONDecodeError as e:
        ap.error(f"--influence {args.influence!r} is not JSON ({e.msg})")
    if args.transformer_tokens is not None and args.transformer_tokens < 1:
        ap.error(f"--transformer-tokens {args.transformer_tokens}: at least 1")
    config = BenchConfig(mode=mode, tasks=tuple(args.tasks), seeds=seeds, out=Path(args.out),
                         tasks_dir=Path(args.tasks_dir), source=Path(args.source), budget_tokens=args.budget_tokens,
                         package=not args.no_package, package_num_proc=args.package_num_proc, force=args.force,
                         pipeline=pipeline, methods=methods, influence=influence, transformer=args.transformer,
                         transformer_preset=args.transformer_preset, transformer_tokens=args.transformer_tokens)
    try:
        method_plan(config)
        plan_transformer(config.transformer)
    except ValueError as e:
        ap.error(str(e))
    command = "python -m benchmarks.bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = run_bench(config, command=command, log=lambda msg: print(msg, flush=True))
    print()
    print(result.markdown)
    extra = ", ppl_transformer.png" if result.summary["ppl_transformer"].drop_nulls().len() else ""
    print(f"\nwrote {result.out}/results.csv, results.md, perplexity.png, kl_reduction.png{extra}")
    if not result.protocol_ok:
        print("evaluation protocol violated: see results.md", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
