"""Report: a human-readable account of a run (markdown, plots, headline JSON) and a Prefect artifact.

It answers what a data engineer asks of a selection: did it fill the budget, is it closer to the
target than the raw pool (KL reduction on hashed n-grams, DSIR's metric), how many clusters it
covers, what was thrown away and why, and how the bandit behaved round by round.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from quadflow.log import get_logger
from quadflow.metrics import OTHER, cluster_coverage, entropy, kl_divergence, source_mix
from quadflow.settings import ConfigError, Settings
from quadflow.store import StageRef, StoreRef, connect, query_sql
from quadflow.tasking import stage_task
from quadflow.tasks.export import MANIFEST, ExportResult, atomic_write_bytes

ARTIFACT_KEY = "quadflow-report"
REPORT_DIR = "report"
TOP_SOURCES = 10
TOP_RULES = 10
SCORE_SAMPLE = 200_000  # pool documents (a seeded hash sample) whose scores the plots draw; stats use all
TOP_CLUSTERS = 50
QUAD = "quad"
PLOT_CLUSTERS = "cluster_sizes.png"
PLOT_SCORES = "score_distributions.png"
PLOT_ROUNDS = "bandit_rounds.png"
PLOT_SOURCES = "source_mix.png"
POOL_COLOR, SELECTED_COLOR = "#9aa5b1", "#d9480f"


@dataclass(frozen=True)
class ReportKeys:
    """Stage partitions the report reads (features may be unknown: then KL is not reported)."""

    docs: str
    clusters: str
    scores: str
    selection: str
    features: str | None = None


@dataclass
class ReportData:
    """Everything the report shows, gathered from the store; the pure core renders it."""

    selector: str
    budget_tokens: int
    pool_docs: int
    pool_tokens: int
    target_docs: int
    selected_docs: int
    selected_tokens: int
    duplicates: int
    quarantined: dict[str, int]
    k: int
    clusters: pl.DataFrame  # cluster, pool_docs, selected_docs, selected_tokens (one row per non-empty cluster)
    scores: dict[str, tuple[np.ndarray, np.ndarray]]  # scorer -> (pool scores (n,), selected scores (s,))
    failed_rules: pl.DataFrame  # rule, pool_docs, selected_docs
    rounds: pl.DataFrame  # round, pulls, mean_reward, mean_probe, accepted, acceptance, tokens_accepted
    probes: dict[str, int]  # probes, docs_probed, calibration_probes
    info: dict[str, str]  # select_info name -> value
    sources: pl.DataFrame  # source, pool_tokens, selected_tokens
    ngrams: dict[str, np.ndarray] | None  # target/raw/selected bucket counts (buckets,); None: no KL
    kl_note: str = ""  # why KL is n/a when ngrams is None
    output: str = ""
    export_key: str = ""
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    reasons: pl.DataFrame | None = None  # reason, docs, tokens: why the selected documents were taken
    # scorer -> (pool docs, pool mean) over the whole pool; `scores` then holds a seeded sample of
    # at most SCORE_SAMPLE pool documents (for the plots), so the report's memory is not the pool's
    score_stats: dict[str, tuple[int, float | None]] | None = None
    # dedup reason -> (pool documents dropped, components they belong to), from the partitions select used
    dedup: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportResult:
    """Where the report went and its headline numbers (what the CLI prints)."""

    report_path: str
    summary_path: str
    images: tuple[str, ...]
    summary: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Core: numbers, markdown and plots (no Prefect, no DuckDB)
# --------------------------------------------------------------------------------------------


def kl_numbers(data: ReportData) -> dict[str, float] | None:
    """KL(target||raw), KL(target||selected) and their difference in nats, or None without a target.

    KL to a small sample is biased upward (its empirical distribution is noisier than the pool's),
    so KL(target||random subset with the selection's tokens) is given as a size-matched reference.
    """
    if data.ngrams is None:
        return None
    t, raw, sel = data.ngrams["target"], data.ngrams["raw"], data.ngrams["selected"]
    kl_raw, kl_sel = kl_divergence(t, raw), kl_divergence(t, sel)
    out = {"kl_target_raw": kl_raw, "kl_target_selected": kl_sel, "kl_reduction": kl_raw - kl_sel}
    if "random" in data.ngrams:
        kl_rnd = kl_divergence(t, data.ngrams["random"])
        out.update(kl_target_random=kl_rnd, kl_reduction_vs_random=kl_rnd - kl_sel)
    return out


def _covered(data: ReportData) -> np.ndarray:
    c = data.clusters.filter(pl.col("selected_docs") > 0)["cluster"].to_numpy()
    return c[(c >= 0) & (c < data.k)]


def headline(data: ReportData) -> dict[str, Any]:
    """The numbers summary.json holds and the CLI prints."""
    kl = kl_numbers(data)
    covered = _covered(data)
    pulls = int(data.rounds["pulls"].sum()) if data.rounds.height else 0
    accepted = int(data.rounds["accepted"].sum()) if data.rounds.height else 0
    return {
        "selector": data.selector,
        "budget_tokens": data.budget_tokens,
        "selected_docs": data.selected_docs,
        "selected_tokens": data.selected_tokens,
        "fill_fraction": round(data.selected_tokens / data.budget_tokens, 4) if data.budget_tokens else None,
        "pool_docs": data.pool_docs,
        "pool_tokens": data.pool_tokens,
        "kl_target_raw": None if kl is None else round(kl["kl_target_raw"], 6),
        "kl_target_selected": None if kl is None else round(kl["kl_target_selected"], 6),
        "kl_reduction": None if kl is None else round(kl["kl_reduction"], 6),
        "kl_reduction_vs_random": None if kl is None or "kl_reduction_vs_random" not in kl
        else round(kl["kl_reduction_vs_random"], 6),
        "cluster_coverage": round(cluster_coverage(covered, data.k), 4) if data.k else None,
        "clusters_covered": int(np.unique(covered).size),
        "clusters": data.k,
        "quarantined": int(sum(data.quarantined.values())),
        "near_duplicates": int(sum(n for n, _ in data.dedup.values())),
        "quarantined_by_reason": dict(data.quarantined),
        "duplicates": data.duplicates,
        "rounds": int(data.rounds.height),
        "acceptance_rate": round(accepted / pulls, 4) if pulls else None,
        "docs_probed": int(data.probes.get("docs_probed", 0)),
        "selected_by_reason": {} if data.reasons is None else
        {r["reason"]: int(r["docs"]) for r in data.reasons.iter_rows(named=True)},
    }


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        return "n/a" if not math.isfinite(x) else f"{x:.{digits}g}" if abs(x) < 1e-3 else f"{x:,.{digits}f}"
    return str(x).replace("|", "\\|")


def _info_value(v: str | None) -> Any:
    """select_info values are text; show numbers as numbers."""
    for cast in (int, float):
        try:
            return cast(v)
        except (TypeError, ValueError):
            pass
    return v


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return out + [""]


def _mean(a: np.ndarray) -> float | None:
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else None


def mix_rows(data: ReportData, top: int = TOP_SOURCES) -> list[tuple[str, float, float]]:
    """(source, pool share, selected share): the top sources of the pool and of the selection."""
    names = data.sources["source"].to_list()
    pool = source_mix(names, data.sources["pool_tokens"].to_numpy(), top=max(len(names), 1))
    sel = source_mix(names, data.sources["selected_tokens"].to_numpy(), top=max(len(names), 1))
    shown = list(dict.fromkeys([*list(sel)[:top], *list(pool)[:top]]))
    rows = [(n, pool.get(n, 0.0), sel.get(n, 0.0)) for n in shown]
    rows.sort(key=lambda r: (-r[2], -r[1], r[0]))
    rest = (1 - sum(r[1] for r in rows) if pool else 0.0, 1 - sum(r[2] for r in rows) if sel else 0.0)
    if max(rest) > 1e-9:
        rows.append((OTHER, max(rest[0], 0.0), max(rest[1], 0.0)))
    return rows


def _block_rows(info: dict[str, Any]) -> list[list[Any]]:
    """How big a block is: documents per block (random blocks) or the tiers and the round's bar (ranked)."""
    if info.get("blocks") != "ranked":
        return [["block size (docs)", _info_value(info.get("block_docs"))]]
    theta = info.get("theta")
    return [
        ["tokens admitted per round (the bar)", _info_value(info.get("round_tokens"))],
        ["rank scorer", _info_value(info.get("rank_scorer"))],
        ["score of the target's own kind (theta)", "n/a (no classifier)" if theta in (None, "None") else
         _info_value(theta)],
        ["pool tokens of the target's kind / likely / related candidates",
         " / ".join(f"{_info_value(info.get(k)):,}" if isinstance(_info_value(info.get(k)), int) else "n/a"
                    for k in ("target_kind_tokens", "likely_target_kind_tokens", "related_tokens"))],
    ]


def build_report(data: ReportData) -> str:
    """The report as markdown; PNGs are linked relative to report.md (same directory)."""
    h = headline(data)
    kl = kl_numbers(data)
    lines = [f"# quadflow report: {data.selector} selection", ""]
    lines += [f"Created {data.created_at}. Output: `{data.output}` (export key `{data.export_key}`).", ""]

    lines += ["## Run summary", ""]
    lines += _table(["", "value"], [
        ["selector", data.selector],
        ["token budget", data.budget_tokens],
        ["selected documents", f"{data.selected_docs:,} of {data.pool_docs:,} in the pool"],
        ["selected tokens", f"{data.selected_tokens:,} of {data.pool_tokens:,} in the pool"],
        ["budget filled", _pct(h["fill_fraction"])],
    ])
    if data.reasons is not None and data.reasons.height:
        lines += ["Why the selected documents were taken (two-level quad: `quad_target_kind`, a document that "
                  "scores like most of the target's own; `quad_likely_target_kind`, the next best, down to a score "
                  "nearly all of the target's documents reach; `quad_related`, chosen for what it adds toward the "
                  "target; "
                  "quad with random blocks: `quad_block`, an accepted block; either: `quad_fill`, filled after "
                  "the bandit stopped short of the budget):", ""]
        lines += _table(["reason", "documents", "tokens"],
                        [[r["reason"], int(r["docs"]), int(r["tokens"])] for r in data.reasons.iter_rows(named=True)])

    lines += ["## Closeness to the target (KL reduction)", ""]
    if kl is None:
        lines += [f"KL reduction: n/a: {data.kl_note or 'no target'}.", ""]
    else:
        lines += [
            "Hashed 1-2-gram distributions, add-one smoothing, nats. KL reduction = KL(target || raw pool) "
            "- KL(target || selection); positive means the selection is closer to the target than the pool "
            "(DSIR, Xie et al. 2023).", "",
        ]
        rows = [
            ["KL(target || raw pool)", kl["kl_target_raw"]],
            ["KL(target || selection)", kl["kl_target_selected"]],
            ["**KL reduction**", kl["kl_reduction"]],
        ]
        if "kl_target_random" in kl:
            rows += [["KL(target || random pool subset, same tokens)", kl["kl_target_random"]],
                     ["KL reduction vs that random subset", kl["kl_reduction_vs_random"]]]
        lines += _table(["", "nats"], rows)
        if "kl_target_random" in kl:
            lines += ["A smaller sample sits further from any distribution by chance alone, so a selection "
                      "much smaller than the pool is best judged against the same-size random subset.", ""]

    lines += ["## Diversity: cluster coverage", ""]
    sizes = data.clusters
    lines += [
        f"Cluster coverage: {h['clusters_covered']:,} of {data.k:,} clusters hold at least one selected "
        f"document ({_pct(h['cluster_coverage'])}).",
        f"Entropy of documents over clusters: pool {entropy(sizes['pool_docs'].to_numpy()) if sizes.height else 0:.3f} "
        f"nats, selection {entropy(sizes['selected_docs'].to_numpy()) if sizes.height else 0:.3f} nats "
        f"(max {math.log(data.k) if data.k else 0:.3f}).", "",
        f"![Cluster sizes, pool vs selected]({PLOT_CLUSTERS})", "",
    ]

    lines += ["## Data thrown away: quarantine and duplicates", ""]
    if data.quarantined:
        lines += ["Quarantined records by reason:", ""]
        lines += _table(["reason", "records"], [[r, n] for r, n in data.quarantined.items()])
    else:
        lines += ["Quarantined records: none.", ""]
    lines += [f"Exact duplicates dropped from the pool: {data.duplicates:,}.", ""]
    if data.dedup:
        lines += ["Near duplicates left out of the selection (every component keeps its first document; "
                  "`near_duplicate`: MinHash LSH or one word apart, `semantic_duplicate`: SemDeDup inside a cluster):", ""]
        lines += _table(["reason", "documents", "components"], [[r, n, c] for r, (n, c) in data.dedup.items()])
    else:
        lines += ["Near duplicates left out of the selection: none (or dedup was off).", ""]

    lines += ["## Scores", ""]
    if data.scores:
        rows = []
        for name, (pool, sel) in data.scores.items():
            n_pool, mp = (data.score_stats or {}).get(name, (pool.size, _mean(pool)))
            ms = _mean(sel)
            rows.append([name, n_pool, mp, sel.size, ms, None if mp is None or ms is None else ms - mp])
        lines += _table(["scorer", "pool docs", "pool mean", "selected docs", "selected mean", "difference"], rows)
        lines += [f"![Score distributions, pool vs selected]({PLOT_SCORES})", ""]
    else:
        lines += ["No scores recorded.", ""]
    if data.failed_rules.height:
        lines += ["Most often failed heuristic rules (documents failing each rule):", ""]
        lines += _table(["rule", "pool docs", "selected docs"], data.failed_rules.rows())

    lines += ["## Bandit", ""]
    if data.selector != QUAD or not data.rounds.height:
        why = f"selector is the {data.selector!r} baseline" if data.selector != QUAD else "no bandit rounds were run"
        lines += [f"Bandit diagnostics: not applicable ({why}).", ""]
    else:
        lines += _table(["", "value"], [
            ["rounds", h["rounds"]],
            ["arm pulls", int(data.rounds["pulls"].sum())],
            ["blocks accepted", int(data.rounds["accepted"].sum())],
            ["acceptance rate", _pct(h["acceptance_rate"])],
            ["documents probed", f"{h['docs_probed']:,} of {data.pool_docs:,} in the pool "
                                 f"({_pct(h['docs_probed'] / data.pool_docs if data.pool_docs else None)})"],
            ["probes (of which calibration)",
             f"{data.probes.get('probes', 0):,} ({data.probes.get('calibration_probes', 0):,})"],
            *_probe_scorer_rows(data),
            ["tau", _info_value(data.info.get("tau"))],
            ["alpha", _info_value(data.info.get("alpha"))],
            *_block_rows(data.info),
        ])
        lines += [f"![Mean reward and acceptance by round]({PLOT_ROUNDS})", ""]
    if data.info:
        lines += ["Selector settings and statistics (select_info):", ""]
        lines += _table(["name", "value"], [[k, _info_value(v)] for k, v in data.info.items()])

    lines += ["## Source mix", ""]
    mix = mix_rows(data)
    if mix:
        lines += ["Share of tokens per source (top sources of the pool and of the selection):", ""]
        lines += _table(["source", "pool", "selection"], [[n, _pct(p), _pct(s)] for n, p, s in mix])
        lines += [f"![Source mix by tokens, pool vs selected]({PLOT_SOURCES})", ""]
    else:
        lines += ["No documents.", ""]
    return "\n".join(lines)


def _probe_scorer_rows(data: ReportData) -> list[list[Any]]:
    """What the probe scorer cost: documents it scored (influence: the probed ones only) and the time."""
    name, scored = data.info.get("probe_scorer"), _info_value(data.info.get("docs_scored"))
    if name is None or not isinstance(scored, int):  # partitions written before probe scorers were recorded
        return []
    pool = data.pool_docs
    seconds = _info_value(data.info.get("probe_seconds"))
    value = (f"{scored:,} of {pool:,} ({_pct(scored / pool if pool else None)}), "
             f"{seconds if isinstance(seconds, (int, float)) else 0:.1f} s")
    if name != "influence":
        value += " (scored pool-wide by the score stage; the time is the lookups')"
    return [["probe scorer", name], ["documents scored by the probe scorer", value]]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def plot_cluster_sizes(pool_sizes: np.ndarray, selected_sizes: np.ndarray) -> bytes:
    """Documents per cluster (clusters sorted by pool size), pool vs selected, log scale."""
    order = np.argsort(-pool_sizes, kind="stable")
    x = np.arange(1, pool_sizes.size + 1)
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    ax.plot(x, pool_sizes[order], color=POOL_COLOR, label="pool", drawstyle="steps-mid")
    ax.plot(x, selected_sizes[order], color=SELECTED_COLOR, label="selected", drawstyle="steps-mid")
    if pool_sizes.max(initial=0) > 0:
        ax.set_yscale("log", nonpositive="mask")  # sizes span decades; empty clusters are not drawn
    ax.set_xlabel("cluster (sorted by pool size)")
    ax.set_ylabel("documents")
    empty = int(np.sum((selected_sizes == 0) & (pool_sizes > 0)))
    ax.set_title(f"Cluster sizes ({empty:,} non-empty clusters with no selected document)")
    ax.legend()
    return _png(fig)


def plot_score_distributions(scores: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """One histogram per scorer: pool vs selected, each normalized to a density."""
    n = max(len(scores), 1)
    fig = Figure(figsize=(4 * n, 3.2))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, (pool, sel)) in zip(axes, scores.items()):
        pool, sel = pool[np.isfinite(pool)], sel[np.isfinite(sel)]
        if pool.size:
            lo, hi = float(pool.min()), float(pool.max())
            bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
            ax.hist(pool, bins=bins, density=True, color=POOL_COLOR, alpha=0.8, label="pool")
            if sel.size:
                ax.hist(sel, bins=bins, density=True, histtype="step", color=SELECTED_COLOR, linewidth=1.5,
                        label="selected")
        ax.set_title(name)
        ax.set_xlabel("score")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("density")
    return _png(fig)


def plot_rounds(rounds: pl.DataFrame) -> bytes:
    """Mean reward (mean probe score - tau) and acceptance rate of each bandit round."""
    fig = Figure(figsize=(8, 3.5))
    ax = fig.add_subplot()
    r = rounds["round"].to_numpy()
    ax.plot(r, rounds["mean_reward"].to_numpy(), color=SELECTED_COLOR, marker=".", label="mean reward")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("round")
    ax.set_ylabel("mean reward")
    ax2 = ax.twinx()
    ax2.bar(r, rounds["acceptance"].to_numpy(), color=POOL_COLOR, alpha=0.4, label="acceptance")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("acceptance rate")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_title("Bandit rounds")
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], fontsize=8)
    return _png(fig)


def plot_source_mix(rows: list[tuple[str, float, float]]) -> bytes:
    """Token share per source, pool vs selected (horizontal bars, largest selected share on top)."""
    fig = Figure(figsize=(8, 0.35 * max(len(rows), 3) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    ax.barh(y + 0.2, [r[1] for r in rows], height=0.4, color=POOL_COLOR, label="pool")
    ax.barh(y - 0.2, [r[2] for r in rows], height=0.4, color=SELECTED_COLOR, label="selected")
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    ax.set_xlabel("share of tokens")
    ax.set_title("Source mix")
    ax.legend(fontsize=8)
    return _png(fig)


def render_plots(data: ReportData) -> dict[str, bytes]:
    """PNG bytes per file name, for the plots that apply to this run."""
    out = {}
    if data.clusters.height:
        pool = np.zeros(data.k, dtype=np.int64)
        sel = np.zeros(data.k, dtype=np.int64)
        c = data.clusters.filter((pl.col("cluster") >= 0) & (pl.col("cluster") < data.k))
        pool[c["cluster"].to_numpy()] = c["pool_docs"].to_numpy()
        sel[c["cluster"].to_numpy()] = c["selected_docs"].to_numpy()
        out[PLOT_CLUSTERS] = plot_cluster_sizes(pool, sel)
    if data.scores:
        out[PLOT_SCORES] = plot_score_distributions(data.scores)
    if data.selector == QUAD and data.rounds.height:
        out[PLOT_ROUNDS] = plot_rounds(data.rounds)
    mix = mix_rows(data)
    if mix:
        out[PLOT_SOURCES] = plot_source_mix(mix)
    return out


def write_report(data: ReportData, directory: str | Path) -> tuple[ReportResult, str]:
    """Write the PNGs, report.md and summary.json atomically; returns the result and the markdown."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    images = []
    for name, png in render_plots(data).items():
        atomic_write_bytes(d / name, png)
        images.append(str(d / name))
    markdown = build_report(data)
    summary = headline(data)
    atomic_write_bytes(d / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write_bytes(d / "report.md", markdown.encode("utf-8"))
    result = ReportResult(report_path=str(d / "report.md"), summary_path=str(d / "summary.json"),
                          images=tuple(images), summary=summary)
    return result, markdown


# --------------------------------------------------------------------------------------------
# Store access and tasks
# --------------------------------------------------------------------------------------------


def _ngram_vectors(frame: pl.DataFrame, n_buckets: int) -> dict[str, np.ndarray] | None:
    """(what, bucket, n) sums -> target/raw/selected/random count vectors (buckets,); what is target | raw |
    selected | random (report_ngrams)."""
    if frame.is_empty():
        return None
    size = max(n_buckets, int(frame["bucket"].max()) + 1)

    def vec(what: str) -> np.ndarray:
        f = frame.filter(pl.col("what") == what)
        return np.bincount(f["bucket"].to_numpy(), weights=f["n"].to_numpy().astype(np.float64), minlength=size)

    if not {"target", "raw"} <= set(frame["what"].unique().to_list()):
        return None
    return {what: vec(what) for what in ("target", "raw", "selected", "random")}


def gather_report_data(con, settings: Settings, keys: ReportKeys, output: str, export_key: str) -> ReportData:
    """Read everything the report shows from the store (a few aggregate queries)."""
    p = {"docs_key": keys.docs, "clusters_key": keys.clusters, "scores_key": keys.scores,
         "selection_key": keys.selection, "features_key": keys.features, "top": TOP_RULES,
         "seed": settings.seed}
    counts = query_sql(con, "export_counts", p).pl().row(0, named=True)
    quarantined = {r: int(n) for r, n in query_sql(con, "export_quarantine", p).fetchall()}
    clusters = query_sql(con, "report_clusters", p).pl()
    k_row = query_sql(con, "report_k", p).fetchone()
    if k_row and k_row[0] is not None:
        k = int(k_row[0])
    else:  # no cluster_info row: the largest cluster id seen
        k = int(clusters["cluster"].max()) + 1 if clusters.height else 0
    modulus = max(1, -(-int(counts["pool_docs"]) // SCORE_SAMPLE))  # keep every modulus-th document (by hash)
    long = query_sql(con, "report_scores", {**p, "modulus": modulus}).pl()
    stats = {name: (int(n), None if mean is None else float(mean))
             for name, n, mean in query_sql(con, "report_score_stats", p).fetchall()}
    scores = {}
    for name in sorted(long["scorer"].unique().to_list(), key=lambda s: (s == "combined", s)):
        f = long.filter(pl.col("scorer") == name)
        scores[name] = (f.filter(pl.col("sampled"))["score"].to_numpy().astype(np.float64),
                        f.filter(pl.col("selected"))["score"].to_numpy().astype(np.float64))
    probes = query_sql(con, "report_probes", p).pl().row(0, named=True)
    info = dict(query_sql(con, "report_info", p).fetchall())
    dedup_keys = [k for k in (info.get("dedup_keys") or "").split(",") if k]
    dedup = {r: (int(n), int(c)) for r, n, c in query_sql(con, "report_dedup", {"keys": dedup_keys}).fetchall()
             } if dedup_keys else {}
    if not settings.ingest.targets or counts["target_docs"] == 0:
        ngrams, note = None, "no target"
    elif keys.features is None:
        ngrams, note = None, "the featurize partition is not recorded for this run"
    else:
        ngrams = _ngram_vectors(query_sql(con, "report_ngrams", p).pl(), settings.featurize.dsir_buckets)
        note = "" if ngrams is not None else "no n-gram counts for the target or the pool"
    return ReportData(
        selector=settings.select.selector, budget_tokens=settings.select.budget_tokens,
        pool_docs=int(counts["pool_docs"]), pool_tokens=int(counts["pool_tokens"]),
        target_docs=int(counts["target_docs"]), selected_docs=int(counts["selected_docs"]),
        selected_tokens=int(counts["selected_tokens"]), duplicates=int(counts["duplicates"]),
        quarantined=quarantined, k=k, clusters=clusters, scores=scores, score_stats=stats,
        failed_rules=query_sql(con, "report_failed_rules", p).pl(),
        rounds=query_sql(con, "report_rounds", p).pl(),
        probes={k_: int(v or 0) for k_, v in probes.items()}, info=info,
        sources=query_sql(con, "report_sources", p).pl(), ngrams=ngrams, kl_note=note,
        output=output, export_key=export_key, reasons=query_sql(con, "report_reasons", p).pl(), dedup=dedup,
    )


def publish_artifacts(data: ReportData, markdown: str, output: str) -> bool:
    """The report, its tables and a link to the output as Prefect artifacts when inside a run."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return False  # outside a run there is nowhere to put them; the files are the report
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=markdown, description="quadflow selection report")
    link = output if "://" in output else Path(output).resolve().as_uri()
    create_link_artifact(key="quadflow-output", link=link, link_text=output,
                         description="the published selection, manifest.json and report/")
    if data.rounds.height:
        create_table_artifact(key="quadflow-bandit-rounds", table=_records(data.rounds),
                              description="Quad bandit: pulls, acceptance and reward per round")
    if data.sources.height:
        create_table_artifact(key="quadflow-selection-by-source", table=_records(data.sources),
                              description="tokens per source, pool vs selection")
    if data.clusters.height:
        top = data.clusters.sort("selected_tokens", "pool_docs", descending=True).head(TOP_CLUSTERS)
        create_table_artifact(key="quadflow-selection-by-cluster", table=_records(top),
                              description=f"the {TOP_CLUSTERS} clusters contributing most selected tokens")
    return True


def _records(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-safe dicts (floats rounded for display)."""
    return [{k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
            for row in frame.iter_rows(named=True)]


@stage_task("report")
def report(settings: Settings, docs: StageRef, features: StageRef, clusters: StageRef, scores: StageRef,
           selection: StageRef, exported: ExportResult) -> ReportResult:
    """Write report/ next to the published selection and show the same markdown in the Prefect UI."""
    keys = ReportKeys(docs=docs.key, clusters=clusters.key, scores=scores.key, selection=selection.key,
                      features=features.key if features is not None else None)
    with connect(docs.store) as con:
        data = gather_report_data(con, settings, keys, exported.output, exported.key)
    result, markdown = write_report(data, Path(exported.output) / REPORT_DIR)
    if exported.url:  # an s3:// output: the report goes up beside the published selection
        result = upload_report(result, Path(exported.output) / REPORT_DIR, exported.url, settings)
    publish_artifacts(data, markdown, exported.url or exported.output)
    get_logger().info(f"report: {result.report_path}")
    return result


def upload_report(result: ReportResult, local_dir: Path, url: str, settings: Settings) -> ReportResult:
    """Upload report/ under the s3:// output prefix; the result then names the uploaded report."""
    from quadflow import objectstore as ob

    client = ob.client(settings.objectstore)
    prefix = f"{url.rstrip('/')}/{REPORT_DIR}"
    for path in sorted(local_dir.iterdir()):
        if path.is_file():
            ob.upload_file(client, path, f"{prefix}/{path.name}")
    return ReportResult(report_path=f"{prefix}/{Path(result.report_path).name}",
                        summary_path=f"{prefix}/{Path(result.summary_path).name}",
                        images=tuple(f"{prefix}/{Path(i).name}" for i in result.images), summary=result.summary)


def report_from_store(store_path: str | Path, output: str | Path | None = None) -> ReportResult:
    """Rebuild the report of the latest export recorded in a store, without Prefect (`quadflow report`)."""
    path = Path(store_path)
    if not path.exists():
        raise ConfigError(f"store {path} does not exist")
    import duckdb

    with duckdb.connect(str(path), read_only=True) as con:
        try:
            store_id = con.execute("select value from store_meta where name = 'store_id'").fetchone()
            latest = query_sql(con, "report_latest").fetchone()
        except duckdb.CatalogException:
            raise ConfigError(f"store {path} holds no published run (no export_runs table)") from None
    if store_id is None or latest is None:
        raise ConfigError(f"store {path} holds no published run")
    export_key, run_output = latest[0], latest[1]
    mpath = Path(run_output) / MANIFEST
    if not mpath.exists():
        raise ConfigError(f"{mpath} does not exist: the latest run's output was moved or deleted")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    if manifest.get("export_key") != export_key:
        raise ConfigError(
            f"{mpath} belongs to export key {manifest.get('export_key')!r}, not the store's latest {export_key!r}"
        )
    settings = Settings.model_validate(manifest["settings"])
    sk = manifest["stage_keys"]
    keys = ReportKeys(docs=sk["ingest"], clusters=sk["cluster"], scores=sk["score"], selection=sk["select"],
                      features=sk.get("featurize"))
    store = StoreRef(path=str(path.resolve()), store_id=store_id[0])
    with connect(store, read_only=True) as con:
        data = gather_report_data(con, settings, keys, run_output, export_key)
    result, _ = write_report(data, Path(output or run_output) / REPORT_DIR)
    return result
