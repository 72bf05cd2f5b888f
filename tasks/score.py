"""Score stage: run the configured scorers on every pool document and combine them.

Each scorer (tasks/scorers/) maps a pool document to a number, higher is better; its rows in
score_docs carry its name and VERSION, and score_info records its settings and fitted
statistics. The `combined` score is the weighted mean of the scorers' percentile ranks in the
pool (tasks/scorers/combine.py); it is what the select stage probes.

Core (no Prefect, no DuckDB): `build_scorers`, `check_targets`, `score_pool`.
Task: `score` reads pool texts (ingest_docs) and hashed n-gram counts (featurize_ngrams) only
when a chosen scorer needs them, calls the core and writes its partition of score_docs and
score_info with delete-then-insert on its key. `load_scores` reads one scorer's scores back.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import polars as pl

from quadflow.log import get_logger
from quadflow.settings import ConfigError, ScoreSettings
from quadflow.store import StageRef, connect, insert_frame, make_ref, query_sql, run_sql, stage_key, transaction
from quadflow.tasking import stage_task
from tasks.featurize import load_ngrams
from tasks.scorers import ScoreInput, Scorer, get_scorer
from tasks.scorers.combine import combine, combined_version, resolve_weights
from tasks.scorers.combine import VERSION as COMBINE_VERSION

VERSION = "score-1"
COMBINED = "combined"

DOCS_SCHEMA = {"doc_idx": pl.Int64, "scorer": pl.String, "version": pl.String, "score": pl.Float64,
               "detail": pl.String}


# ---------------------------------------------------------------------------------------------
# Core
# ---------------------------------------------------------------------------------------------


def check_targets(names: list[str], has_targets: bool) -> None:
    """Scorers that learn from the target set cannot run without one: say which and what to do."""
    needing = [n for n in names if get_scorer(n).needs_target()]
    if needing and not has_targets:
        raise ConfigError(
            f"score.scorers = {names}: {', '.join(repr(n) for n in needing)} need a target set, but the "
            "ingest partition has no target documents; give --target or drop them from score.scorers"
        )


def build_scorers(settings: ScoreSettings, names: list[str], random_state: int) -> list[Scorer]:
    """One configured scorer per name, in order, all seeded with random_state."""
    if not names:
        raise ConfigError("score.scorers is empty: choose at least one scorer")
    return [get_scorer(name).from_settings(settings, random_state) for name in names]


def score_pool(scorers: list[Scorer], data: ScoreInput,
               weights: dict[str, float] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Run every scorer, then the combined score.

    Returns (docs, info): docs has one row per (pool document, scorer) including 'combined'
    (doc_idx, scorer, version, score, detail); info one row per scorer (scorer, version, params
    as JSON text).
    """
    log = get_logger()
    w = resolve_weights([s.name for s in scorers], weights)
    doc_idx = np.arange(data.n_docs, dtype=np.int64)
    frames, info, by_name = [], [], {}
    for scorer in scorers:
        start = time.perf_counter()
        result = scorer.run(data)
        seconds = time.perf_counter() - start
        log.info(f"score: {scorer.name} ({scorer.VERSION}) scored {data.n_docs:,} docs in {seconds:.1f}s")
        by_name[scorer.name] = result.score
        frames.append(_docs_frame(doc_idx, scorer.name, scorer.VERSION, result.score, result.detail))
        info.append((scorer.name, scorer.VERSION, {**result.params, "seconds": round(seconds, 3)}))

    version = combined_version({s.name: s.VERSION for s in scorers})
    frames.append(_docs_frame(doc_idx, COMBINED, version, combine(by_name, w), None))
    info.append((COMBINED, version, {
        "method": "weighted mean of percentile ranks in the pool (average ranks for ties)",
        "combine_version": COMBINE_VERSION,
        "weights": w,
        "components": {s.name: s.VERSION for s in scorers},
    }))
    info_frame = pl.DataFrame(
        {
            "scorer": [name for name, _, _ in info],
            "version": [v for _, v, _ in info],
            "params": [json.dumps(p, sort_keys=True, default=_json_default) for _, _, p in info],
        },
        schema={"scorer": pl.String, "version": pl.String, "params": pl.String},
    )
    return pl.concat(frames), info_frame


def _docs_frame(doc_idx: np.ndarray, name: str, version: str, score: np.ndarray,
                detail: pl.Series | None) -> pl.DataFrame:
    n = doc_idx.size
    return pl.DataFrame(
        {
            "doc_idx": doc_idx,
            "scorer": pl.repeat(name, n, dtype=pl.String, eager=True),
            "version": pl.repeat(version, n, dtype=pl.String, eager=True),
            "score": np.asarray(score, dtype=np.float64),
            "detail": detail.cast(pl.String) if detail is not None else pl.repeat(None, n, dtype=pl.String, eager=True),
        },
        schema=DOCS_SCHEMA,
    )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"score_info params hold a value JSON cannot store: {obj!r}")


# ---------------------------------------------------------------------------------------------
# Store access
# ---------------------------------------------------------------------------------------------


def load_scores(con: Any, key: str, scorer: str = COMBINED) -> np.ndarray:
    """One scorer's scores of a score partition as (n_pool,) float64, row i = doc_idx i."""
    cols = query_sql(con, "score_read_scores", {"key": key, "scorer": scorer}).fetchnumpy()
    doc_idx, scores = np.asarray(cols["doc_idx"]), np.asarray(cols["score"], dtype=np.float64)
    if doc_idx.size == 0:
        raise ValueError(f"score partition {key!r} has no {scorer!r} scores")
    if not np.array_equal(doc_idx, np.arange(doc_idx.size)):
        gap = int(np.flatnonzero(doc_idx != np.arange(doc_idx.size))[0])
        raise ValueError(f"score partition {key!r}, scorer {scorer!r}: doc_idx is not dense 0..n-1 "
                         f"(position {gap} holds {int(doc_idx[gap])})")
    return scores


def _role_counts(con: Any, key: str) -> dict[str, int]:
    """Documents per role of an ingest partition, checked to be indexed 0..n-1."""
    out = {}
    for role, docs, lo, hi in query_sql(con, "score_count_docs", {"key": key}).fetchall():
        if (lo, hi) != (0, docs - 1):
            raise ValueError(f"ingest_docs {key}/{role}: doc_idx spans {lo}..{hi} for {docs} documents")
        out[role] = int(docs)
    return out


def _load_input(con: Any, scorers: list[Scorer], docs_key: str, features_key: str, n_pool: int) -> ScoreInput:
    """Read only the inputs the chosen scorers need."""
    needs = set().union(*(s.needs for s in scorers))
    texts = ngrams = target = None
    if "texts" in needs:
        table = query_sql(con, "score_read_texts", {"key": docs_key, "role": "pool"}).fetch_arrow_table()
        texts = pl.from_arrow(table.column("text")).alias("text")
    if needs & {"ngrams", "target_ngrams"}:
        ngrams = load_ngrams(con, features_key, "pool")
        if ngrams.shape[0] != n_pool:
            raise ValueError(f"featurize_ngrams {features_key}/pool has {ngrams.shape[0]} rows for {n_pool} "
                             "pool documents: is the featurize partition from this ingest partition?")
        if "target_ngrams" in needs:
            target = load_ngrams(con, features_key, "target")
    return ScoreInput(n_docs=n_pool, texts=texts, ngrams=ngrams, target_ngrams=target)


# ---------------------------------------------------------------------------------------------
# Task
# ---------------------------------------------------------------------------------------------


@stage_task("score")
def score(settings: ScoreSettings, docs: StageRef, features: StageRef, seed: int) -> StageRef:
    """Score every pool document with the configured scorers and their combination."""
    key = stage_key("score", VERSION, settings, docs, features, seed)
    log = get_logger()
    with connect(docs.store) as con:
        counts = _role_counts(con, docs.key)
        n_pool, has_targets = counts.get("pool", 0), counts.get("target", 0) > 0
        if n_pool == 0:
            raise ValueError(f"ingest partition {docs.key!r} has no pool documents to score")
        names = settings.resolved(has_targets)
        check_targets(names, has_targets)
        unused = sorted(set(settings.weights) - set(names))
        if unused:
            log.warning(f"score: weights for {unused} are ignored: those scorers are not run ({names})")
        scorers = build_scorers(settings, names, seed)
        log.info(f"score: {', '.join(names)} on {n_pool:,} pool docs"
                 f" ({counts.get('target', 0):,} target docs)")

        data = _load_input(con, scorers, docs.key, features.key, n_pool)
        frame, info = score_pool(scorers, data, settings.weights)
        del data

        run_sql(con, "score_create")
        with transaction(con):
            run_sql(con, "score_delete", {"key": key})
            insert_frame(con, "score_insert_docs", frame, {"key": key})
            insert_frame(con, "score_insert_info", info, {"key": key})
        return make_ref(con, "score", key, docs.store, "score_docs", ["doc_idx", "scorer", "score"])
