"""The reference quality-filter pipeline: datatrove's own Gopher, C4 and FineWeb filters, unmodified.

What users run instead of quadflow's heuristic scorer, in FineWeb's published order
(huggingface/datatrove examples/fineweb.py): GopherRepetitionFilter, GopherQualityFilter,
C4QualityFilter(filter_no_terminal_punct=False), FineWebQualityFilter, with their default
(published) thresholds, read by datatrove's JsonlReader and run by its LocalPipelineExecutor.

Nothing is downloaded at run time:
- English words are split by spaCy's blank "en" tokenizer, which is what datatrove assigns to
  English (assets/tokenizer_assignment.csv); it ships inside the `spacy` wheel, no model download.
- No filter here needs NLTK's punkt data: C4QualityFilter splits on lines (split_paragraph=True,
  its default), and FineWeb/Gopher split words, not sentences, so `word_tokenize` is never called.
- datatrove imports huggingface_hub; HF_HUB_OFFLINE=1 keeps it off the network (the data is local).

datatrove parallelizes over files (one task per file), so `shard_jsonl` writes the documents as
one file per worker first; that staging is timed apart from the filtering.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class DatatroveResult:
    """Documents in and kept, drops by filter and reason, and the filtering's wall time."""

    docs_in: int
    docs_kept: int
    dropped: dict[str, int] = field(default_factory=dict)  # "<filter>/<reason>" -> documents
    seconds: float = 0.0
    version: str = ""


def filter_steps() -> list:
    """The four filters in FineWeb's order, datatrove's default thresholds (the published ones)."""
    from datatrove.pipeline.filters import (
        C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter,
    )

    return [
        GopherRepetitionFilter(),  # Rae et al. 2021 (Gopher), table A1: duplicate lines/paragraphs/n-grams
        GopherQualityFilter(),  # Gopher: 50-100k words, mean word length 3-10, symbol/word <= 0.1, ...
        C4QualityFilter(filter_no_terminal_punct=False),  # Raffel et al. 2020 (C4) line rules, as FineWeb runs it
        FineWebQualityFilter(),  # Penedo et al. 2024 (FineWeb): line punctuation, short lines, duplicated chars
    ]


def shard_jsonl(lines: Iterable[str], out_dir: Path, shards: int) -> list[Path]:
    """Write JSON lines round-robin into `shards` plain .jsonl files (datatrove runs one task per file)."""
    if shards < 1:
        raise ValueError(f"shards = {shards!r}; it must be >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"part-{i:03d}.jsonl" for i in range(shards)]
    handles = [open(p, "w", encoding="utf-8") for p in paths]
    try:
        for i, line in enumerate(lines):
            handles[i % shards].write(line if line.endswith("\n") else line + "\n")
    finally:
        for h in handles:
            h.close()
    return paths


def _dropped(stats: Sequence[dict]) -> tuple[int, int, dict[str, int]]:
    """(docs in, docs kept, drops by filter/reason) from datatrove's merged stats.json."""
    docs_in = docs_kept = 0
    dropped: dict[str, int] = {}
    filters = [s for s in stats if "FILTER" in s.get("name", "")]
    for i, step in enumerate(filters):
        counters = step.get("stats", {})
        name = step["name"].split(":", 1)[-1]
        name = name[next((j for j, ch in enumerate(name) if ch.isalnum()), len(name)):].strip()  # drop the emoji
        if i == 0:
            docs_in = int(_total(counters.get("total", 0)))
        if i == len(filters) - 1:
            docs_kept = int(_total(counters.get("forwarded", 0)))
        for key, value in counters.items():
            if key.startswith("dropped_"):
                dropped[f"{name}/{key.removeprefix('dropped_')}"] = int(_total(value))
    return docs_in, docs_kept, dropped


def _total(value) -> float:
    return value.get("total", 0) if isinstance(value, dict) else value


def run_filters(data_dir: Path, workers: int = 2, work_dir: Path | None = None,
                write_kept: bool = True) -> DatatroveResult:
    """Run the filter pipeline over every .jsonl file in `data_dir` with `workers` processes.

    Kept documents are written as JSONL (datatrove's JsonlWriter, gzip) to work_dir/kept when
    `write_kept`, the way the pipeline is used; logs and stats go to work_dir/logs.
    """
    from importlib.metadata import version

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    with tempfile.TemporaryDirectory(prefix="datatrove-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        files = sorted(Path(data_dir).glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"no .jsonl files in {data_dir}")
        steps = [JsonlReader(str(data_dir), glob_pattern="*.jsonl", text_key="text", id_key="id"), *filter_steps()]
        if write_kept:
            steps.append(JsonlWriter(str(work / "kept")))
        executor = LocalPipelineExecutor(pipeline=steps, tasks=len(files), workers=min(workers, len(files)),
                                         logging_dir=str(work / "logs"), skip_completed=False)
        t0 = time.perf_counter()
        executor.run()
        seconds = time.perf_counter() - t0
        stats = json.loads((work / "logs" / "stats.json").read_text())
        docs_in, docs_kept, dropped = _dropped(stats)
    return DatatroveResult(docs_in, docs_kept, dropped, round(seconds, 3), version("datatrove"))
