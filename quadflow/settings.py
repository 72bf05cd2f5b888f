"""One frozen settings model for the CLI, the YAML config file and the flow parameters.

Each stage reads only its own section, so a task's cache key moves only when its own
settings move. Defaults marked "auto" are resolved from the data at run time and the
resolved value is written to the run's manifest.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

SCORERS = ("heuristic", "dsir", "classifier", "influence")
SELECTORS = ("quad", "random", "topk", "dsir")


class ConfigError(ValueError):
    """Bad configuration: the message names the setting and the offending value."""


# After ConfigError: quadflow.objectstore imports it back (either module may be imported first).
from quadflow.objectstore import ObjectStoreSettings  # noqa: E402
from quadflow.section import Section  # noqa: E402  (frozen, closed, no booleans for numbers, no NaN)

# Seeds go to numpy's and scikit-learn's generators, which take 0 <= seed < 2**32.
MAX_SEED = 2**32 - 1


class IngestSettings(Section):
    inputs: list[str] = Field(
        default_factory=list,
        description="Pool files, directories, globs or s3:// prefixes/globs (JSONL, .jsonl.gz, .jsonl.zst, "
        "Parquet, .txt).",
    )
    targets: list[str] = Field(
        default_factory=list,
        description="Target/reference set: what good data looks like. Same formats as inputs.",
    )
    text_field: str = Field("text", description="Field holding the document text.")
    id_field: str | None = Field(
        "id", description="Field holding the source's own id, carried to the output if present."
    )
    max_doc_chars: int = Field(
        1_000_000, gt=0, description="Documents longer than this are quarantined as 'oversize'."
    )
    batch_rows: int = Field(50_000, gt=0, description="Rows parsed per batch before writing to the store.")
    since: date | None = Field(
        None, description="Only pool inputs under a date=YYYY-MM-DD/ path segment with that date >= since "
        "(e.g. the newest partition of a bucket); targets are not filtered.",
    )
    partitions: list[date] | None = Field(
        None, description="Only pool inputs under date=YYYY-MM-DD/ path segments with one of these dates.",
    )
    incremental: bool = Field(
        True, description="Reuse the documents of inputs (files or objects) already ingested into this store "
        "unchanged, and read only new or changed ones; False: read every input again.",
    )


class DedupSettings(Section):
    """Near-duplicate removal between ingest and select (tasks/dedup.py); the selection keeps one document per component."""

    enabled: bool = Field(
        True, description="Fuzzy dedup of the pool: MinHash LSH on word shingles, plus one-word-edit neighbourhoods for "
        "short documents; one document (the first by doc_idx) is kept per connected component of candidate pairs.",
    )
    shingle_size: int = Field(
        5, ge=1, le=8, description="Words per shingle for long documents (FineWeb: 5). A document of W words uses "
        "min(shingle_size, max(2, W // words_per_shingle_word)) so one changed word changes about a tenth of its shingles.",
    )
    words_per_shingle_word: int = Field(
        10, ge=1, description="Shorter documents get shorter shingles: one shingle word per this many document words.",
    )
    permutations: int = Field(112, ge=2, le=1024, description="MinHash values per document (FineWeb: 112).")
    bands: int | None = Field(
        None, ge=1, description="LSH bands (rows per band = permutations // bands); auto: 14 (FineWeb's 14 x 8, "
        "candidate threshold ~0.72), or chosen from threshold when that is set.",
    )
    threshold: float | None = Field(
        None, gt=0, lt=1, description="Jaccard similarity the LSH should separate at: bands and rows are then chosen "
        "(bands x rows <= permutations) to minimise the false-positive plus false-negative area around it, as "
        "datasketch does; leave bands unset.",
    )
    short_words: int = Field(
        20, ge=0, description="Documents of min_words..short_words words are matched by their one-word-edit "
        "neighbourhood (exact: same words but one substituted, inserted or deleted) instead of MinHash, which has "
        "too few shingles to tell a one-word edit from a different short document; 0 turns this off.",
    )
    min_words: int = Field(
        3, ge=1, description="Documents with fewer words are left to ingest's exact dedup (one word apart is not a duplicate).",
    )
    semantic: bool = Field(
        False, description="Semantic dedup (SemDeDup) after cluster: inside each k-means cluster, documents whose "
        "vectors have cosine similarity above 1 - semantic_eps are one component; one is kept.",
    )
    semantic_eps: float = Field(
        0.01, gt=0, lt=1, description="SemDeDup's epsilon: pairs with cosine similarity > 1 - eps are duplicates "
        "(0.01 is NeMo Curator's tightest default; tune it on the vectors in use, see README).",
    )

    @model_validator(mode="after")
    def _lsh_shape(self) -> "DedupSettings":
        if self.threshold is not None and self.bands is not None:
            raise ValueError(f"dedup.threshold = {self.threshold} and dedup.bands = {self.bands}: set one of them")
        if self.bands is not None and self.bands > self.permutations:
            raise ValueError(f"dedup.bands = {self.bands} exceeds dedup.permutations = {self.permutations}")
        if self.short_words and self.short_words < self.min_words:
            raise ValueError(f"dedup.short_words = {self.short_words} is below dedup.min_words = {self.min_words}")
        return self

    def lsh_shape(self) -> tuple[int, int]:
        """(bands, rows per band) of the LSH, with 'auto' resolved."""
        if self.threshold is not None:
            return optimal_lsh_shape(self.threshold, self.permutations)
        bands = self.bands if self.bands is not None else min(14, self.permutations)
        return bands, self.permutations // bands


def optimal_lsh_shape(threshold: float, permutations: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= permutations minimising the equally weighted false-positive and false-negative
    areas of the S-curve 1 - (1 - s^rows)^bands around threshold (datasketch's MinHashLSH rule)."""
    import numpy as np

    lo, hi = np.linspace(0, threshold, 201), np.linspace(threshold, 1, 201)  # midpoint sums of the two areas
    mid_lo, mid_hi = (lo[1:] + lo[:-1]) / 2, (hi[1:] + hi[:-1]) / 2
    best, shape = float("inf"), (1, permutations)
    for bands in range(1, permutations + 1):
        for rows in range(1, permutations // bands + 1):
            fp = (1 - (1 - mid_lo**rows) ** bands).sum() * (threshold / 200)
            fn = ((1 - mid_hi**rows) ** bands).sum() * ((1 - threshold) / 200)
            if fp + fn < best:
                best, shape = fp + fn, (bands, rows)
    return shape


class FeaturizeSettings(Section):
    n_features: int = Field(
        2**18, ge=1024, description="Hashed word 1-2-gram space for the TF-IDF vectors."
    )
    dsir_buckets: int = Field(
        10_000, ge=16, le=65_535, description="Hashed 1-2-gram buckets for DSIR, the classifier and KL."
    )
    dim: int = Field(64, ge=2, le=1024, description="Dense vector size (TF-IDF -> truncated SVD).")
    svd_sample: int = Field(
        20_000, ge=100, description="Documents the TF-IDF weights and SVD are fitted on."
    )
    svd_sample_by: Literal["docs", "tokens"] = Field(
        "docs", description="How the svd_sample documents are drawn: docs (uniformly, so short records "
        "that are most of a pool's documents shape the components) or tokens (in proportion to their tokens, so "
        "the components describe the text most of the pool's tokens are in: long documents get vectors that tell "
        "their domains apart).",
    )
    max_chars: int = Field(
        20_000, ge=100, description="Only the first max_chars of a document are featurized."
    )


class ClusterSettings(Section):
    k: int | None = Field(
        None, ge=2, description="Number of clusters; auto: about sqrt(pool size), within [8, 10000]."
    )
    batch_size: int = Field(4096, ge=64, description="MiniBatchKMeans batch size.")
    fit_sample: int = Field(
        500_000, ge=1000, description="Pool documents (a seeded sample) k-means is fitted on; every document is "
        "then assigned in streamed batches, so memory does not grow with the pool. Pools this size or smaller "
        "are fitted whole.",
    )
    gamma: float | None = Field(
        None,
        gt=0,
        le=2,
        description="Neighbour radius (cosine distance between centroids) for reward sharing; "
        "auto: median distance from a centroid to its 5th-nearest centroid.",
    )
    balance: Literal["tokens", "docs"] = Field(
        "tokens",
        description="tokens: a k-means cluster holding more than max_token_multiple / k of the pool's tokens is "
        "split by a token-weighted k-means of its members, so long manuals of different sources do not share one "
        "huge cluster (k may end above the k asked for); docs: plain k-means over documents.",
    )
    max_token_multiple: float = Field(
        6.0, ge=1, description="With balance = tokens: the most tokens a cluster may hold, in multiples of an "
        "even share (1/k of the pool's tokens); at the auto k of a 354k-document pool, about 1%.",
    )

    @model_validator(mode="after")
    def _k_fits_the_sample(self) -> "ClusterSettings":
        if self.k is not None and self.k > self.fit_sample:
            raise ValueError(f"k = {self.k} exceeds fit_sample = {self.fit_sample}: k-means needs at least k "
                             "fitted documents")
        return self


def influence_available() -> bool:
    """Whether torch is importable, checked without importing it (the influence scorer needs it)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _require_influence(what: str) -> None:
    if not influence_available():
        from quadflow.tasks.scorers.influence.errors import TORCH_HINT

        raise ValueError(f"{what}: {TORCH_HINT}")


class InfluenceSettings(Section):
    """The influence scorer (Quad): a proxy LM's gradients against the target set's, K-FAC/EK-FAC preconditioned."""

    method: Literal["ekfac", "kfac", "cosine"] = Field(
        "ekfac", description="ekfac / kfac: Kronecker-factored inverse Gauss-Newton (Quad); cosine: projected-"
        "gradient cosine (LESS/TracIn, no Hessian).",
    )
    layers: Literal["attention", "attention+mlp"] = Field(
        "attention", description="Proxy layers whose gradients count: attention projections (Quad) or also the MLP.",
    )
    damping: float = Field(
        0.1, ge=0, description="Damping as a multiple of each layer's mean eigenvalue (Grosse et al. 2023).",
    )
    proj_dim: int | None = Field(
        None, ge=1, description="Score through a seeded CountSketch of this size; None: exact inner products.",
    )
    max_chunks: int = Field(1, ge=1, description="A document counts by its first max_chunks * seq_len tokens.")
    batch_tokens: int = Field(8192, ge=1, description="Padded tokens per forward/backward batch (raise on a GPU).")
    proxy_path: str | None = Field(
        None, description="Local proxy checkpoint directory (quadflow proxy or Hugging Face causal LM, never "
        "downloaded); None: train the proxy below on a seeded pool sample.",
    )
    n_layers: int = Field(1, ge=1, description="Proxy transformer blocks (trained proxy).")
    d_model: int = Field(64, ge=2, description="Proxy width (trained proxy).")
    n_heads: int = Field(2, ge=1, description="Proxy attention heads; must divide d_model.")
    seq_len: int = Field(128, ge=8, description="Proxy context in tokens (bytes for the trained proxy).")
    steps: int = Field(300, ge=1, description="Proxy training steps (batches of 16 windows).")
    train_docs: int = Field(5000, ge=1, description="Pool documents sampled (seeded) to train the proxy on.")
    fit_docs: int = Field(1000, ge=1, description="Pool documents sampled (seeded) to fit the curvature factors on.")
    reference_docs: int = Field(
        5000, ge=1, description="Target documents (seeded sample when there are more) whose mean gradient is the query.",
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$", description="auto: cuda when available, else cpu.",
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads torch uses for the proxy (None: torch's default, one per core). On a "
        "machine other work shares, 1 avoids thread oversubscription (see BENCHMARKS.md).",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "InfluenceSettings":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model = {self.d_model} is not divisible by n_heads = {self.n_heads}")
        return self


class ScoreSettings(Section):
    scorers: list[Literal["heuristic", "dsir", "classifier", "influence"]] | None = Field(
        None,
        description="Scorers to run. auto: dsir+classifier with a target set, heuristic without. "
        "Scores are combined as the weighted mean of each scorer's percentile rank in the pool. 'influence' "
        "is fitted here but scores only the documents the bandit probes (select.probe_scorer = 'influence'), "
        "so it is not part of the combined score.",
    )
    influence: InfluenceSettings = Field(default_factory=InfluenceSettings)
    weights: dict[str, float] = Field(
        default_factory=dict, description="Weight per scorer in the combined score (default 1 each)."
    )
    classifier_negative_docs: int = Field(
        5000, ge=1, description="Pool documents sampled (seeded) as the classifier's negatives, capped by the pool."
    )
    classifier_negatives_by: Literal["tokens", "documents"] = Field(
        "tokens", description="Sample the classifier's negatives in proportion to their tokens (a document's "
        "chance is its share of the pool's text) or uniformly over documents.",
    )

    @field_validator("weights")
    @classmethod
    def _known_weights(cls, v: dict[str, float]) -> dict[str, float]:
        for name, w in v.items():
            if name not in SCORERS:
                raise ValueError(f"unknown scorer {name!r} in weights; known: {', '.join(SCORERS)}")
            if w < 0:
                raise ValueError(f"weight for {name!r} is {w}; weights must be >= 0")
        return v

    @field_validator("scorers")
    @classmethod
    def _influence_needs_torch(cls, v: list[str] | None) -> list[str] | None:
        if v and "influence" in v:
            _require_influence("scorer 'influence'")
        return v

    def resolved(self, has_targets: bool) -> list[str]:
        """The scorers to run, with 'auto' resolved."""
        if self.scorers is None:
            return ["dsir", "classifier"] if has_targets else ["heuristic"]
        return list(dict.fromkeys(self.scorers))


class SelectSettings(Section):
    selector: Literal["quad", "random", "topk", "dsir"] = Field(
        "quad", description="quad (cluster bandit) or a baseline: random, topk, dsir."
    )
    budget_tokens: int = Field(1_000_000, gt=0, description="Token budget of the selection.")
    blocks: Literal["ranked", "random"] = Field(
        "ranked", description="quad's blocks. ranked (two-level Quad): a pulled cluster offers its best candidates "
        "by utility (rank score tiers, then a novelty discount against what is already selected), and the bandit "
        "decides how many of each cluster's blocks to accept; random: Quad as published, a random block of the "
        "cluster's shuffled documents (block_docs, tau_quantile and calibration_blocks apply).",
    )
    rank_scorer: Literal["combined", "heuristic", "dsir", "classifier"] | None = Field(
        None, description="Pool-wide score that orders documents and sets the candidate tiers (ranked blocks). "
        "auto: classifier when it ran (it knows how the target's own documents score), else combined.",
    )
    arms_per_round: int = Field(50, ge=1, description="B: clusters pulled per round.")
    probes: int = Field(10, ge=1, description="m: documents probed per pulled cluster.")
    rounds: int = Field(
        30, ge=1, le=10_000, description="Ranked blocks: rounds the budget is spread over; each round's bar "
        "admits budget / rounds tokens, so the novelty discount is updated that often.",
    )
    candidate_multiple: float = Field(
        8.0, ge=1, le=1000, description="Ranked blocks: candidates are the best documents by rank score holding this "
        "many times the budget in tokens. The select stage holds only them, so its memory follows budget x this "
        "multiple, not the pool (about 0.5 GB for a 5M-token budget at 8).",
    )
    target_quantile: float = Field(
        0.25, ge=0, lt=1, description="Ranked blocks: a pool document is of the target's own kind when its classifier "
        "score reaches the score this (token-weighted) share of the target's documents fall below, out of fold.",
    )
    likely_quantile: float = Field(
        0.02, ge=0, lt=1, description="Ranked blocks: ... and likely of that kind (taken next, by score) when it "
        "reaches the score only this share of the target's documents fall below.",
    )
    dsir_min_tokens: int = Field(
        100, ge=0, description="selector dsir: documents shorter than this many tokens are drawn only after every "
        "longer one (the published DSIR's min_example_length, 100 words, leaves them out); 0: no floor.",
    )
    max_doc_share: float = Field(
        0.03, gt=0, le=1, description="Ranked blocks: likely and related documents (not surely of the target's kind) "
        "longer than this share of the budget are left to the fill, so no single document crowds out the rest.",
    )
    diversity: bool = Field(
        True, description="Ranked blocks: order candidates by novelty (the KL drop toward the target each would bring, "
        "a discount against what is already selected); false: by rank score alone.",
    )
    novelty_prior: float = Field(
        0.1, gt=0, le=100, description="Ranked blocks: the selection's n-gram distribution is smoothed with this many "
        "budgets' worth of pool text, so the first documents are not judged against an empty selection.",
    )
    block_docs: int | None = Field(
        None, ge=1, description="Random blocks: b, documents per accepted block; auto: mean cluster size / 8, at most "
        "budget / (10 * B * mean doc tokens), at least probes."
    )
    max_rounds: int = Field(200, ge=1, description="Bandit rounds before the fill phase.")
    tau: float | None = Field(
        None, description="Acceptance threshold on the mean probe score; auto: tau_quantile of the calibration "
        "probe means."
    )
    tau_quantile: float | None = Field(
        None, ge=0, le=1, description="Quantile of calibration probe means used for auto tau; auto: ranked blocks "
        "0 when the probes look up the rank score (exact) and 0.5 otherwise; random blocks 1 - budget / pool "
        "tokens, within [0.5, 0.9].")
    alpha: float | None = Field(
        None, ge=0, description="UCB exploration weight; auto: std of calibration probe means."
    )
    calibration_blocks: int = Field(
        64, ge=2, description="Random blocks: random probe groups (of m documents) drawn to calibrate tau and alpha."
    )
    probe_scorer: Literal["combined", "heuristic", "dsir", "classifier", "influence"] | None = Field(
        None, description="Score the bandit's probes by: a pool-wide score of the score stage (combined or one "
        "scorer), or 'influence', computed on demand for the probed documents only (needs 'influence' in "
        "score.scorers). auto: the rank score (ranked blocks), combined (random blocks). random/topk/dsir ignore it.",
    )

    @field_validator("probe_scorer")
    @classmethod
    def _influence_needs_torch(cls, v: str | None) -> str | None:
        if v == "influence":
            _require_influence("probe scorer 'influence'")
        return v


class ExportSettings(Section):
    output: str = Field(
        "quadflow-output", description="Directory or s3:// prefix the selection and manifest go to (the report "
        "goes to report/ in the directory, or in the local copy of an s3:// output next to the store).",
    )
    format: Literal["parquet", "jsonl"] = Field("parquet", description="Selection file format.")
    overwrite: bool = Field(
        False, description="Publish into an output that quadflow did not create (a non-empty directory without "
        "its marker) or that another store published to; without it such an output is refused, naming it.",
    )


class RunSettings(Section):
    """How a run executes; results never depend on these (they are not part of any stage key)."""

    runner: str = Field(
        "processes",
        pattern=r"^(threads|processes|dask|ray|(dask|tcp|ray)://[A-Za-z0-9_.\-\[\]:]+)$",
        description="Task runner for shard tasks: threads, processes (a local process pool), dask (a local "
        "Dask cluster), dask://HOST:PORT (an existing Dask scheduler), ray (the Ray cluster RAY_ADDRESS names, else "
        "a local Ray instance) or ray://HOST:PORT (a Ray cluster through Ray Client); dask and ray through prefect-dask "
        "and prefect-ray.",
    )
    workers: int | None = Field(None, ge=1, description="Worker processes/threads (default: one per core).")
    shard_docs: int = Field(
        50_000, ge=1, description="Documents per shard of dedup, featurize, cluster and score (ingest's exact "
        "dedup and dedup's candidate join take 8x as many documents' keys per hash range): sets their peak "
        "memory, not the results."
    )
    parts: str | None = Field(
        None, description="Where shard parts go: a directory the workers share, or an s3://bucket/prefix on the "
        "objectstore.* endpoint, so workers on other machines need no shared file system (default: <store>.parts "
        "beside the store).",
    )

    @field_validator("parts")
    @classmethod
    def _parts_location(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError("parts is empty: name a directory or an s3://bucket/prefix, or leave it unset")
        from quadflow import objectstore as ob  # here: the two modules import each other

        if ob.is_s3(v):
            try:
                ob.parse(v)
            except ConfigError as err:  # no valid bucket name
                raise ValueError(f"parts: {err}") from None
            return "s3://" + v[5:]
        if "://" in v:
            raise ValueError(f"parts {v!r}: only local directories and s3:// prefixes are supported")
        return v


class Settings(Section):
    """Everything a curation run needs. Backs the CLI, the YAML config and the flow parameters."""

    store: str = Field("quadflow.duckdb", description="DuckDB file holding every intermediate result.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed for every random step (0 to 2**32 - 1).")
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    featurize: FeaturizeSettings = Field(default_factory=FeaturizeSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    score: ScoreSettings = Field(default_factory=ScoreSettings)
    select: SelectSettings = Field(default_factory=SelectSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    objectstore: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    run: RunSettings = Field(default_factory=RunSettings)

    @field_validator("store")
    @classmethod
    def _store_is_a_file_name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("store must name a DuckDB file, e.g. work/quadflow.duckdb")
        if v.endswith(("/", "\\")):
            raise ValueError("store names a directory; name the DuckDB file in it, e.g. work/quadflow.duckdb")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if not self.ingest.inputs:
            raise ValueError("ingest.inputs is empty: give at least one --input")
        scorers = self.score.resolved(bool(self.ingest.targets))
        needs_target = [s for s in scorers if s in ("dsir", "classifier", "influence")]
        if needs_target and not self.ingest.targets:
            raise ValueError(
                f"score.scorers = {needs_target} need a target set: give --target"
            )
        if self.select.selector == "dsir" and not self.ingest.targets:
            raise ValueError("select.selector = 'dsir' needs a target set: give --target")
        if not [s for s in scorers if s != "influence"]:
            raise ValueError("score.scorers = ['influence'] alone leaves no pool-wide score to combine: "
                             "add heuristic, dsir or classifier")
        for name in ("probe_scorer", "rank_scorer"):
            chosen = getattr(self.select, name)
            if chosen not in (None, "combined") and chosen not in scorers:
                raise ValueError(f"select.{name} = {chosen!r} is not among score.scorers = {scorers}: "
                                 "add it with --scorer")
        return self


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "settings"
        value = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("value_error",) and not e["loc"]:
            lines.append(f"invalid settings: {msg}")
        else:
            lines.append(f"invalid setting {loc} = {value!r}: {msg}")
    return "\n".join(lines)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge nested dicts; values from `over` win, None in `over` means 'not given'."""
    out = dict(base)
    for key, value in over.items():
        if value is None:
            continue
        if isinstance(value, dict):
            merged = deep_merge(out[key] if isinstance(out.get(key), dict) else {}, value)
            if merged or key in out:
                out[key] = merged
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of settings, got {type(data).__name__}")
    return data


def build_settings(config: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from an optional YAML file with overrides on top; ConfigError names the bad setting."""
    data = load_yaml(config) if config else {}
    data = deep_merge(data, overrides or {})
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None
