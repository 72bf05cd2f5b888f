"""Score stage: run the configured scorers on every pool document and combine them.

Each scorer (tasks/scorers/) maps a pool document to a number, higher is better; its rows in
score_docs carry its name and VERSION, and score_info records its settings and fitted
statistics. The `combined` score is the weighted mean of the pool-wide scorers' percentile ranks
in the pool (tasks/scorers/combine.py); it is what the select stage probes by default.

The influence scorer is not pool-wide: it costs a proxy LM's backward pass per document, so this
stage only trains (or loads) the proxy and fits the scorer on the target set, saves the fitted
state beside the store (`<store>.artifacts/influence-<key>.pt`, path and sha256 in score_info)
and scores nothing; the select stage scores the documents the bandit probes with it
(select.probe_scorer = 'influence').

Core (no Prefect, no DuckDB): `build_scorers`, `check_targets`, `score_part` (one shard with fitted
scorers), `score_pool` (the whole pool in memory: the same numbers, for tests and small pools),
`influence_sample`.
Task: `score` fits the pool-wide scorers on statistics read from the store (exact n-gram totals,
the target's n-grams, a seeded sample of pool rows), then scores shard by shard (quadflow.shards:
`score_shard` tasks on the flow's task runner, each reading a Parquet part of texts and hashing their
n-grams as featurize did), keeps each shard's output part as it finishes (`<store>.data/score/`,
read in place through the view score_docs), and computes the combined score from percentile
ranks taken in the store; score_info gets each scorer's params (per-shard counts merged).
`load_scores` reads one scorer's scores back; `ensure_influence_state` fits the influence
scorer's state (or reuses a valid one).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import scipy.sparse as sp
from prefect import task
from prefect.cache_policies import NO_CACHE

from quadflow import settings as qsettings
from quadflow.log import Progress, get_logger
from quadflow.objectstore import ObjectStoreSettings
from quadflow.settings import ConfigError, InfluenceSettings, RunSettings, ScoreSettings
from quadflow.shards import (Parts, Shard, ShardResult, drop_loaded_table, export_texts,
                             forget_unusable_shards, keep_outputs, plan_shards, point_views, run_shards, shard_infos,
                             stage_parts, text_parts, worker_name)
from quadflow.store import StageRef, connect, insert_frame, make_ref, query_sql, run_sql, stage_key, transaction
from quadflow.tasking import SHARDED_CACHE_POLICY, stage_task, transient_failure
from quadflow.tasks.featurize import _list_column, featurize_space, hashed_ngrams, load_ngrams, role_counts
from quadflow.tasks.scorers import FitInput, ScoreInput, Scorer, get_scorer
from quadflow.tasks.scorers.combine import combine, combine_ranks, combined_version, resolve_weights
from quadflow.tasks.scorers.combine import VERSION as COMBINE_VERSION

VERSION = "score-2"
PARAMS_META = "quadflow.score.params"  # output part metadata: each scorer's params for this shard
COMBINE_CHUNK = 500_000  # documents per chunk of the combined score (bounds its memory)
COMBINED = "combined"
INFLUENCE = "influence"

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


def check_influence(names: list[str]) -> None:
    """Asking for the influence scorer without torch is a configuration error, found before any work."""
    if INFLUENCE in names and not qsettings.influence_available():
        from quadflow.tasks.scorers.influence.errors import TORCH_HINT

        raise ConfigError(TORCH_HINT)


def pool_wide(names: list[str]) -> list[str]:
    """The scorers that score every pool document (and make up the combined score), in order."""
    return [n for n in names if get_scorer(n).pool_wide]


def build_scorers(settings: ScoreSettings, names: list[str], random_state: int) -> list[Scorer]:
    """One configured scorer per name, in order, all seeded with random_state."""
    if not names:
        raise ConfigError("score.scorers is empty: choose at least one scorer")
    return [get_scorer(name).from_settings(settings, random_state) for name in names]


def influence_sample(settings: InfluenceSettings, n_pool: int, n_target: int,
                     random_state: int) -> dict[str, np.ndarray]:
    """Seeded doc_idx samples the influence scorer is fitted on: 'reference' (target docs, at most
    reference_docs), 'fit' (pool docs for the curvature factors) and 'train' (pool docs for the proxy,
    disjoint from 'fit' when the pool allows; none with a checkpoint), each sorted."""
    ref_rng, pool_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(random_state).spawn(2))
    ref = np.arange(n_target) if n_target <= settings.reference_docs else ref_rng.choice(
        n_target, size=settings.reference_docs, replace=False)
    n_train = 0 if settings.proxy_path is not None else settings.train_docs
    pick = pool_rng.choice(n_pool, size=min(n_pool, settings.fit_docs + n_train), replace=False)
    fit = pick[: settings.fit_docs]
    train = pick[settings.fit_docs:] if pick.size > settings.fit_docs else pick
    if n_train == 0:
        train = pick[:0]
    return {"reference": np.sort(ref).astype(np.int64), "fit": np.sort(fit).astype(np.int64),
            "train": np.sort(train).astype(np.int64)}


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
    return pl.concat(frames), info_frame(info)


def info_frame(rows: list[tuple[str, str, dict[str, Any]]]) -> pl.DataFrame:
    """score_info rows (scorer, version, params as JSON text)."""
    return pl.DataFrame(
        {
            "scorer": [name for name, _, _ in rows],
            "version": [v for _, v, _ in rows],
            "params": [json.dumps(p, sort_keys=True, default=_json_default) for _, _, p in rows],
        },
        schema={"scorer": pl.String, "version": pl.String, "params": pl.String},
    )


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


def influence_state_path(store_path: str, key: str) -> Path:
    """Where a score partition's fitted influence state lives: a directory beside the store file."""
    return Path(f"{store_path}.artifacts") / f"influence-{key}.pt"


def read_texts_at(con: Any, docs_key: str, role: str, idx: np.ndarray, max_chars: int) -> list[str]:
    """Texts (first max_chars characters) of the documents `idx` of one role, in the order of `idx`."""
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size == 0:
        return []
    cols = query_sql(con, "score_read_texts_at", {"key": docs_key, "role": role, "idx": idx.tolist(),
                                                  "max_chars": int(max_chars)}).fetchnumpy()
    got = np.asarray(cols["doc_idx"], dtype=np.int64)
    pos = {int(d): i for i, d in enumerate(got)}
    missing = [int(d) for d in idx if int(d) not in pos]
    if missing:
        raise ValueError(f"ingest_docs {docs_key}/{role} has no document with doc_idx {missing[0]}")
    texts = cols["text"]
    return [texts[pos[int(d)]] for d in idx]


def _influence_info(con: Any, key: str) -> dict[str, Any] | None:
    """The influence row of a score partition's score_info (None: no such row, or no score tables yet)."""
    try:
        row = query_sql(con, "score_read_info", {"key": key, "scorer": INFLUENCE}).fetchone()
    except duckdb.CatalogException:
        return None
    return None if row is None else json.loads(row[0])


def ensure_influence_state(con: Any, settings: InfluenceSettings, docs_key: str, n_pool: int, n_target: int,
                           random_state: int, path: Path, reuse: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit the influence scorer and save its state to `path`, or reuse the file when it is the one
    `reuse` (an earlier score_info row for the same key) describes; returns the score_info params."""
    from quadflow.tasks.scorers.influence import InfluenceUnavailable

    try:
        from quadflow.tasks.scorers.influence.fitted import STATE_FORMAT, fit_influence, save_fitted, sha256_file, text_limits
    except InfluenceUnavailable as e:
        raise ConfigError(str(e)) from None
    log = get_logger()
    if reuse is not None and path.is_file() and reuse.get("sha256") == sha256_file(path):
        log.info(f"score: influence state {path} is unchanged; reusing it")
        return reuse
    start = time.perf_counter()
    sample = influence_sample(settings, n_pool, n_target, random_state)
    score_chars, train_chars = text_limits(settings)
    reference = read_texts_at(con, docs_key, "target", sample["reference"], score_chars)
    fit = read_texts_at(con, docs_key, "pool", sample["fit"], score_chars)
    train = read_texts_at(con, docs_key, "pool", sample["train"], train_chars)
    log.info(f"score: influence: {'training' if settings.proxy_path is None else 'loading'} the proxy, fitting "
             f"{settings.method} on {len(fit):,} pool docs against {len(reference):,} target docs")
    scorer, stats = fit_influence(settings, reference, fit, train, random_state)
    sha = save_fitted(scorer, path, meta={"docs_key": docs_key}, proxy_path=settings.proxy_path)
    seconds = time.perf_counter() - start
    log.info(f"score: influence fitted in {seconds:.1f}s; state {path} (sha256 {sha[:12]})")
    return {
        "path": str(path), "sha256": sha, "format": STATE_FORMAT, "settings": settings.model_dump(mode="json"),
        "random_state": random_state, "scorer": scorer.get_params(), "max_chars": score_chars,
        "pool_wide": False, **stats, "seconds": round(seconds, 3),
        "note": "fitted only: scores the documents the bandit probes (select.probe_scorer = 'influence')",
    }


def _csr(table: pa.Table, n_buckets: int) -> sp.csr_matrix:
    """(rows, n_buckets) float32 counts from arrow list columns buckets/counts."""
    if table.num_rows == 0:
        return sp.csr_matrix((0, n_buckets), dtype=np.float32)
    indptr, buckets = _list_column(table, "buckets")
    _, counts = _list_column(table, "counts")
    return sp.csr_matrix((counts.astype(np.float32), buckets.astype(np.int32), indptr), shape=(table.num_rows, n_buckets))


def needs_ngrams(scorers: list[Scorer]) -> bool:
    """Whether any of the scorers reads hashed n-gram counts (the pool's or the target's)."""
    return any(s.needs & {"ngrams", "target_ngrams"} for s in scorers)


def _fit_input(con: Any, scorers: list[Scorer], docs_key: str, features_key: str, n_pool: int) -> FitInput:
    """Pool-wide statistics the scorers fit on, read from the store without loading the pool."""
    needs = set().union(*(s.needs for s in scorers))
    if not needs_ngrams(scorers):
        return FitInput(n_pool=n_pool)
    n_buckets, totals = pool_ngram_totals(con, features_key)
    empty = int(query_sql(con, "score_empty_docs", {"key": features_key}).fetchone()[0])

    def pool_rows(idx: np.ndarray) -> sp.csr_matrix:
        return read_pool_rows(con, features_key, idx, n_buckets)

    target = load_ngrams(con, features_key, "target", n_buckets) if "target_ngrams" in needs else None
    return FitInput(n_pool=n_pool, target_ngrams=target, pool_totals=totals, pool_rows=pool_rows, empty_docs=empty,
                    pool_tokens=pool_tokens(con, docs_key, n_pool))


def pool_tokens(con: Any, docs_key: str, n_pool: int) -> np.ndarray:
    """(n_pool,) int64 token count of every pool document, by doc_idx."""
    cols = query_sql(con, "select_read_tokens", {"key": docs_key, "lo": 0, "hi": None}).fetchnumpy()
    if not np.array_equal(np.asarray(cols["doc_idx"]), np.arange(n_pool)):
        raise ValueError(f"ingest_docs {docs_key}/pool does not hold doc_idx 0..{n_pool - 1} exactly once")
    return np.asarray(cols["n_tokens"], dtype=np.int64)


NGRAM_CHECK_DOCS = 64  # pool documents whose stored n-grams are compared with their texts' before scoring


def check_ngram_hashing(con: Any, docs_key: str, features_key: str, n_pool: int, n_buckets: int,
                        max_chars: int, n_check: int = NGRAM_CHECK_DOCS) -> None:
    """Fail unless the n-grams featurize stored for a spread of pool documents are their texts' hashed n-grams.

    Score shards hash their documents' n-grams from the texts themselves, while the scorers were
    fitted on what featurize stored: the two must be the same counts. They are whenever one version
    of quadflow wrote both; a featurize partition written by another hashing would mix spaces silently.
    """
    idx = np.unique(np.linspace(0, n_pool - 1, min(n_check, n_pool)).round().astype(np.int64))
    texts = read_texts_at(con, docs_key, "pool", idx, 2**31 - 1)  # whole, as the shard tasks read them
    got = hashed_ngrams(texts, n_buckets, max_chars)
    stored = read_pool_rows(con, features_key, idx, n_buckets)
    bad = np.flatnonzero(np.asarray(abs(got - stored).sum(axis=1)).ravel() > 0)
    if bad.size:
        raise ValueError(f"featurize partition {features_key!r}: the stored n-gram counts of pool document "
                         f"{int(idx[bad[0]])} are not its text's hashed n-grams ({bad.size} of {idx.size} checked "
                         f"differ); the partition was written by another version: featurize again")


def pool_ngram_totals(con: Any, features_key: str) -> tuple[int, np.ndarray]:
    """(n_buckets, (n_buckets,) float64 exact totals of the pool's hashed n-gram counts), summed in the store."""
    n_buckets, _ = featurize_space(con, features_key)
    totals = np.zeros(n_buckets, dtype=np.float64)
    cols = query_sql(con, "score_pool_totals", {"key": features_key}).fetchnumpy()
    totals[np.asarray(cols["bucket"], dtype=np.int64)] = np.asarray(cols["total"], dtype=np.float64)
    return n_buckets, totals


# Documents per query of read_pool_rows: its scratch (DuckDB's result, the arrow columns) is one query's.
ROWS_READ = 1 << 15


def read_pool_rows(con: Any, features_key: str, idx: np.ndarray, n_buckets: int) -> sp.csr_matrix:
    """(len(idx), n_buckets) CSR n-gram counts of the pool documents idx, in the order of idx.

    Read ROWS_READ documents at a time, by ascending doc_idx, each query bounded to its documents' range.
    """
    idx = np.asarray(idx, dtype=np.int64)
    order = np.argsort(idx, kind="stable")
    want = idx[order]
    parts = []
    for lo in range(0, want.size, ROWS_READ):
        chunk = want[lo:lo + ROWS_READ]
        con.register("picked", pa.table({"doc_idx": pa.array(chunk)}))
        try:
            table = query_sql(con, "score_ngrams_at", {"key": features_key, "role": "pool", "lo": int(chunk[0]),
                                                       "hi": int(chunk[-1])}).fetch_arrow_table()
        finally:
            con.unregister("picked")
        if not np.array_equal(table.column("doc_idx").to_numpy(), chunk):
            raise ValueError(f"featurize_ngrams {features_key}/pool lacks some of the {idx.size} requested documents")
        parts.append(_csr(table, n_buckets))
        del table
    rows = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, n_buckets), dtype=np.float32)
    return rows[np.argsort(order)] if not np.all(np.diff(idx) >= 0) else rows


def score_part(table: pa.Table, scorers: list[Scorer], n_buckets: int, max_chars: int
               ) -> tuple[pl.DataFrame, dict[str, dict]]:
    """Score one shard (doc_idx, text) with fitted scorers: rows for score_docs, params per scorer.

    The documents' hashed n-gram counts are computed here from their texts, with the featurize
    stage's space (n_buckets) and max_chars: the same counts, bit for bit, that featurize stored
    (`hashed_ngram_spaces` counts each space alone), so the flow's process exports only texts.
    """
    doc_idx = table.column("doc_idx").to_numpy()
    texts = pl.from_arrow(table.column("text")).alias("text")
    ngrams = hashed_ngrams(texts, n_buckets, max_chars) if needs_ngrams(scorers) else None
    data = ScoreInput(n_docs=table.num_rows, texts=texts, ngrams=ngrams)
    frames, params = [], {}
    for scorer in scorers:
        result = scorer.run_apply(data)
        frames.append(_docs_frame(doc_idx, scorer.name, scorer.VERSION, result.score, result.detail))
        params[scorer.name] = result.params
    return pl.concat(frames), params


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


@task(name="score-shard", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient_failure)
def score_shard(shard: Shard, input_path: str, output_path: str, scorers_path: str, n_buckets: int,
                max_chars: int, parts: Parts) -> ShardResult:
    """Score one shard: its input part (doc_idx, text) -> its output part (score_docs rows; per-scorer params in
    the metadata)."""
    start = time.perf_counter()
    scorers = parts.load_pickle(scorers_path)
    table = parts.read_table(input_path, columns=["doc_idx", "text"])
    if not np.array_equal(table.column("doc_idx").to_numpy(), np.arange(shard.lo, shard.hi)):
        raise ValueError(f"input part {input_path} does not hold doc_idx {shard.lo}..{shard.hi - 1} in order")
    frame, params = score_part(table, scorers, n_buckets, max_chars)
    out = frame.to_arrow()
    out = out.replace_schema_metadata({PARAMS_META: json.dumps(params, default=_json_default)})
    rows = parts.write_parquet(output_path, [out])
    return ShardResult(shard, output_path, rows, time.perf_counter() - start, worker_name())


def _score_parts(con: Any, settings: ScoreSettings, run: RunSettings, wide: list[str], docs: StageRef,
                 features: StageRef, key: str, n_pool: int, seed: int,
                 objectstore: ObjectStoreSettings | None) -> tuple[pl.DataFrame, Parts]:
    """Fit the pool-wide scorers, score the pool shard by shard, combine; returns their score_info rows."""
    log = get_logger()
    scorers = build_scorers(settings, wide, seed)
    start = time.perf_counter()
    fit = _fit_input(con, scorers, docs.key, features.key, n_pool)
    for scorer in scorers:
        scorer.fit(fit)
    n_buckets, max_chars = featurize_space(con, features.key)  # the space the fit's n-gram totals are in
    if needs_ngrams(scorers):
        check_ngram_hashing(con, docs.key, features.key, n_pool, n_buckets, max_chars)
    log.info(f"score: fitted {', '.join(wide)} in {time.perf_counter() - start:.1f}s")
    parts = stage_parts(run, docs.store.path, "score", key, objectstore)
    parts.check()
    scorers_path = parts.url("scorers.pkl")
    parts.save_pickle(scorers_path, scorers)
    params: dict[str, list[dict]] = {s.name: [] for s in scorers}
    load = keep_outputs("score", key, parts, docs.store.path, info_meta=PARAMS_META)  # the ledger keeps the params
    progress = Progress("score", n_pool)
    texts = text_parts(run, docs.store.path, docs.key, objectstore)  # the shard tasks hash their n-grams
    shards = plan_shards({"pool": n_pool}, run.shard_docs)
    forget_unusable_shards(con, "score", key, shards, docs.store.path)
    stats = run_shards(con, "score", key, shards, parts, export_texts(con, docs.key, texts), score_shard,
                       {"scorers_path": scorers_path, "n_buckets": n_buckets, "max_chars": max_chars},
                       load, progress, rows_per_doc=len(scorers), inputs=texts)
    progress.close()
    log.info(f"score: {stats.summary()}")
    for text in shard_infos(con, "score", key):  # every shard's params, including those of earlier runs
        for name, p in json.loads(text).items():
            if name in params:
                params[name].append(p)
    info = [(s.name, s.VERSION, {**type(s).merge_params(params[s.name]), "shards": stats.total}) for s in scorers]
    w = resolve_weights(wide, settings.weights)
    version = combined_version({s.name: s.VERSION for s in scorers})
    info.append((COMBINED, version, {
        "method": "weighted mean of percentile ranks in the pool (average ranks for ties)",
        "combine_version": COMBINE_VERSION, "weights": w, "components": {s.name: s.VERSION for s in scorers},
    }))
    with transaction(con):
        point_views(con, "score", "score_views", docs.store.path)
        run_sql(con, "score_delete_info", {"key": key})
        run_sql(con, "score_ranks", {"key": key, "scorers": wide})
        for lo in range(0, n_pool, COMBINE_CHUNK):
            hi = min(lo + COMBINE_CHUNK, n_pool)
            ranks = {name: _chunk_ranks(con, name, lo, hi) for name in wide}
            frame = _docs_frame(np.arange(lo, hi, dtype=np.int64), COMBINED, version, combine_ranks(ranks, w), None)
            insert_frame(con, "score_insert_docs", frame, {"key": key})
        con.execute("drop table if exists score_ranks")
    return info_frame(info), parts


def _chunk_ranks(con: Any, scorer: str, lo: int, hi: int) -> np.ndarray:
    cols = query_sql(con, "score_ranks_range", {"scorer": scorer, "lo": lo, "hi": hi}).fetchnumpy()
    if not np.array_equal(np.asarray(cols["doc_idx"]), np.arange(lo, hi)):
        raise ValueError(f"score_docs lacks {scorer!r} scores for doc_idx {lo}..{hi - 1}")
    return np.asarray(cols["pct"], dtype=np.float64)


@stage_task("score", cache_policy=SHARDED_CACHE_POLICY)
def score(settings: ScoreSettings, docs: StageRef, features: StageRef, seed: int,
          run: RunSettings = RunSettings(), objectstore: ObjectStoreSettings | None = None) -> StageRef:
    """Score every pool document with the pool-wide scorers and their combination; fit the influence scorer.

    Shard by shard (quadflow.shards): scorers are fitted here on pool-wide statistics (n-gram
    totals, a seeded sample), each shard is scored by a shard task, and its output part is kept
    in `<store>.data/score/` as it finishes (read in place through the view score_docs); the
    combined score's pool-wide ranks are computed in the store.
    """
    key = stage_key("score", VERSION, settings, docs, features, seed)
    log = get_logger()
    parts = None
    with connect(docs.store) as con:
        counts = role_counts(con, docs.key)
        n_pool, has_targets = counts.get("pool", 0), counts.get("target", 0) > 0
        if n_pool == 0:
            raise ValueError(f"ingest partition {docs.key!r} has no pool documents to score")
        names = settings.resolved(has_targets)
        if not names:
            raise ConfigError("score.scorers is empty: choose at least one scorer")
        check_influence(names)
        check_targets(names, has_targets)
        wide = pool_wide(names)
        unused = sorted(set(settings.weights) - set(wide))
        if unused:
            log.warning(f"score: weights for {unused} are ignored: those scorers are not in the combined score "
                        f"({wide})")
        log.info(f"score: {', '.join(names)} on {n_pool:,} pool docs"
                 f" ({counts.get('target', 0):,} target docs)")
        drop_loaded_table(con, "score", "score_docs")
        run_sql(con, "score_create")
        reuse = _influence_info(con, key)  # read before this run rewrites score_info
        info = info_frame([])
        if wide:
            info, parts = _score_parts(con, settings, run, wide, docs, features, key, n_pool, seed, objectstore)
        else:
            with transaction(con):
                run_sql(con, "score_delete", {"key": key})
        if INFLUENCE in names:
            params = ensure_influence_state(
                con, settings.influence, docs.key, n_pool, counts.get("target", 0), seed,
                influence_state_path(docs.store.path, key), reuse=reuse)
            info = pl.concat([info, info_frame([(INFLUENCE, get_scorer(INFLUENCE).VERSION, params)])])
        with transaction(con):
            run_sql(con, "score_delete_info_only", {"key": key})
            insert_frame(con, "score_insert_info", info, {"key": key})
        ref = make_ref(con, "score", key, docs.store, "score_docs", ["doc_idx", "scorer", "score"])
    if parts is not None:
        parts.clean()
    return ref
