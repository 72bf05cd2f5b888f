"""Benchmark tasks: a target domain cut out of a mixed pool, with a disjoint held-out set for scoring.

Each task names a domain by the value(s) of one field of the records (by default `source`).
The domain's documents are split, seeded, into three parts:

- `heldout.jsonl`: evaluation only; selectors never see it, and no pool document shares its text;
- `target.jsonl`: the target sample handed to selectors ("what good looks like");
- the rest of the domain stays in `pool.jsonl.zst` with every other document of the source.

The target sample is removed from the pool as well as the held-out set: a selector should be
rewarded for finding *new* in-domain text, not for handing back the reference it was given.
The split is made over groups of exact duplicates (`quadflow.text.content_hash`), and any pool
document whose normalized text equals a held-out or target document is dropped, so the same text
can never be both selected and scored. Records are copied byte for byte.

Files per task directory: pool.jsonl.zst, target.jsonl, heldout.jsonl, task.json (the spec,
the source file's sha256, counts, token counts in quadflow tokens, and each file's sha256). A task
whose task.json matches the spec, seed and source, and whose files are intact, is not rebuilt.

Building the same from other data: any JSONL file (plain, .gz or .zst) with an `id` field
(unique), a `text` field and a field that tells the domains apart works. Either

    python -m benchmarks.build_tasks --source data.jsonl.zst --out runs/tasks \\
        --define legal=collection:court-opinions,statutes

or, from Python, `build_tasks("data.jsonl.zst", "runs/tasks", [TaskSpec("legal",
("court-opinions", "statutes"), field="collection")], seed=2026)`. Pick a domain large enough
that the held-out set holds a few hundred thousand tokens, so perplexity differences are stable.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import zstandard

from benchmarks.eval.ngram_lm import Vocab
from quadflow.text import content_hash, count_tokens_expr

BUILDER_VERSION = "tasks-1"
DEFAULT_SEED = 2026
FILES = ("pool.jsonl.zst", "target.jsonl", "heldout.jsonl")


@dataclass(frozen=True)
class TaskSpec:
    """One target domain: records whose `field` is one of `values`; fractions of it go to target and held-out."""

    name: str
    values: tuple[str, ...]
    field: str = "source"
    target_frac: float = 0.2
    heldout_frac: float = 0.2
    max_target_docs: int = 1000
    max_heldout_docs: int = 1000
    # A transfer task removes the rest of the domain from the pool too: the selector cannot find
    # copies of the target's own source and must find related text instead.
    transfer: bool = False

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"task name {self.name!r} must be a plain directory name")
        if not self.values:
            raise ValueError(f"task {self.name!r} names no {self.field} values")
        total = self.target_frac + self.heldout_frac
        if not (0 < self.target_frac and 0 < self.heldout_frac and (total <= 1 if self.transfer else total < 1)):
            leave = "sum to at most 1" if self.transfer else "leave part of the domain in the pool"
            raise ValueError(
                f"task {self.name!r}: target_frac = {self.target_frac!r} and heldout_frac = "
                f"{self.heldout_frac!r} must be > 0 and {leave}"
            )
        object.__setattr__(self, "values", tuple(self.values))


# Domains of the shared Debian pool (debian-pool-v1): three documentation styles and prose, and
# two transfer tasks whose source is not in the pool at all. The Wikipedia source holds only 105
# long articles, so its tasks hold out a larger share (37 and 53 articles) to rank methods stably.
TASKS = {
    "python-docs": TaskSpec("python-docs", ("python3.11-doc",)),
    "postgres-docs": TaskSpec("postgres-docs", ("postgresql-doc-15",)),
    "kernel-docs": TaskSpec("kernel-docs", ("linux-doc-6.1",)),
    "encyclopedic": TaskSpec("encyclopedic", ("gensim-enwiki-shortened",), heldout_frac=0.35),
    "postgres-transfer": TaskSpec("postgres-transfer", ("postgresql-doc-15",), target_frac=0.5,
                                  heldout_frac=0.5, transfer=True),
    "encyclopedic-transfer": TaskSpec("encyclopedic-transfer", ("gensim-enwiki-shortened",), target_frac=0.5,
                                      heldout_frac=0.5, transfer=True),
}


# ------------------------------------------------------------------------------------ reading


def _open_text(path: str | Path) -> io.TextIOBase:
    p = str(path)
    if p.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().stream_reader(open(p, "rb"), closefd=True)
        return io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
    if p.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8", newline="\n")
    return open(p, encoding="utf-8", newline="\n")


def iter_lines(path: str | Path) -> Iterator[str]:
    """Non-blank lines of a JSONL file (plain, .gz or .zst), newline stripped."""
    with _open_text(path) as fh:
        for line in fh:
            line = line.rstrip("\n")
            if line.strip():
                yield line


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a JSONL file (plain, .gz or .zst)."""
    return [json.loads(line) for line in iter_lines(path)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tokens(texts: Sequence[str]) -> int:
    """Token count in quadflow's budget unit (quadflow.text.TOKEN_PATTERN)."""
    if not texts:
        return 0
    return int(pl.DataFrame({"text": texts}, schema={"text": pl.String}).select(count_tokens_expr().sum()).item())


# ------------------------------------------------------------------------------------ building


def split_domain(ids: Sequence[str], hashes: Sequence[str], spec: TaskSpec, seed: int) -> tuple[list[int], list[int]]:
    """Positions of the held-out and target representatives: a seeded split of duplicate groups.

    Each group of identical texts goes wholly to one side; its smallest id represents it.
    """
    groups: dict[str, int] = {}  # content hash -> position of the smallest id holding it
    for i, (doc_id, h) in enumerate(zip(ids, hashes)):
        if h not in groups or doc_id < ids[groups[h]]:
            groups[h] = i
    reps = sorted(groups.values(), key=lambda i: ids[i])  # (groups,) in id order, independent of file order
    n = len(reps)
    n_held = min(spec.max_heldout_docs, max(1, round(spec.heldout_frac * n)))
    n_target = min(spec.max_target_docs, max(1, round(spec.target_frac * n)))
    if n_held + n_target > n or (n_held + n_target == n and not spec.transfer):
        raise ValueError(
            f"task {spec.name!r}: the domain has {n} distinct documents, too few for {n_held} held-out "
            f"+ {n_target} target with some left in the pool"
        )
    order = np.random.default_rng(seed).permutation(n)
    held = sorted(reps[i] for i in order[:n_held])
    target = sorted(reps[i] for i in order[n_held:n_held + n_target])
    return held, target


def _spec_record(spec: TaskSpec, seed: int, source: Path, source_sha: str) -> dict:
    return {
        "builder": BUILDER_VERSION,
        "spec": asdict(spec) | {"values": list(spec.values)},
        "seed": seed,
        "source": {"path": str(source), "sha256": source_sha},
        "target_in_pool": False,
    }


def _up_to_date(task_dir: Path, want: dict) -> bool:
    meta_path = task_dir / "task.json"
    if not meta_path.exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return False
    if any(meta.get(k) != v for k, v in want.items() if k != "source"):
        return False
    if meta.get("source", {}).get("sha256") != want["source"]["sha256"]:
        return False
    files = meta.get("files", {})
    return all((task_dir / f).exists() and files.get(f) == _sha256(task_dir / f) for f in FILES)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_tasks(
    source: str | Path,
    out_root: str | Path,
    specs: Sequence[TaskSpec] | None = None,
    seed: int = DEFAULT_SEED,
    force: bool = False,
) -> list[dict]:
    """Build each task under out_root/<name> (skipping those already built the same way); their task.json records."""
    source = Path(source).resolve()
    out_root = Path(out_root)
    specs = list(specs if specs is not None else TASKS.values())
    source_sha = _sha256(source)
    wanted = {s.name: _spec_record(s, seed, source, source_sha) for s in specs}
    todo = [s for s in specs if force or not _up_to_date(out_root / s.name, wanted[s.name])]
    if not todo:
        return [json.loads((out_root / s.name / "task.json").read_text()) for s in specs]

    lines = list(iter_lines(source))
    ids: list[str] = []
    texts: list[str] = []
    fields = {s.field for s in todo}
    labels: dict[str, list] = {f: [] for f in fields}
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{n} is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), (str, int)):
            raise ValueError(f"{source}:{n} has no string or integer 'id': {line[:120]!r}")
        ids.append(str(rec["id"]))
        text = rec.get("text")
        texts.append(text if isinstance(text, str) else "")
        for f in fields:
            labels[f].append(rec.get(f))
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in zip(*np.unique(np.array(ids), return_counts=True)) if c > 1)
        raise ValueError(f"{source}: id {dup!r} occurs more than once; task ids must be unique")
    hashes = [content_hash(t) for t in texts]

    records = []
    for spec in todo:
        values = set(spec.values)
        domain = [i for i, v in enumerate(labels[spec.field]) if v in values]
        if not domain:
            raise ValueError(f"task {spec.name!r}: no record of {source} has {spec.field} in {sorted(values)!r}")
        held_pos, target_pos = split_domain([ids[i] for i in domain], [hashes[i] for i in domain], spec, seed)
        held = [domain[i] for i in held_pos]
        target = [domain[i] for i in target_pos]
        taken_hashes = {hashes[i] for i in held} | {hashes[i] for i in target}
        if spec.transfer:  # the whole domain (and every copy of its texts) leaves the pool
            taken_hashes |= {hashes[i] for i in domain}
        pool = [i for i in range(len(lines)) if hashes[i] not in taken_hashes]
        domain_set = set(domain)

        task_dir = out_root / spec.name
        task_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(task_dir / "heldout.jsonl", "".join(lines[i] + "\n" for i in held).encode("utf-8"))
        _write_atomic(task_dir / "target.jsonl", "".join(lines[i] + "\n" for i in target).encode("utf-8"))
        payload = "".join(lines[i] + "\n" for i in pool).encode("utf-8")
        _write_atomic(task_dir / "pool.jsonl.zst", zstandard.ZstdCompressor(level=3, threads=2).compress(payload))
        del payload

        meta = wanted[spec.name] | {
            "counts": {
                "source_docs": len(lines),
                "domain_docs": len(domain),
                "heldout_docs": len(held),
                "target_docs": len(target),
                "pool_docs": len(pool),
                "pool_domain_docs": sum(1 for i in pool if i in domain_set),
                # held-out/target texts' other copies (any source), removed from the pool too; for a
                # transfer task, also the rest of the domain
                "removed_duplicates": len(lines) - len(pool) - len(held) - len(target),
            },
            "tokens": {
                "heldout": _tokens([texts[i] for i in held]),
                "target": _tokens([texts[i] for i in target]),
                "pool": _tokens([texts[i] for i in pool]),
                "pool_domain": _tokens([texts[i] for i in pool if i in domain_set]),
            },
            "files": {f: _sha256(task_dir / f) for f in FILES},
        }
        _write_atomic(task_dir / "task.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
        records.append(meta)
    built = {r["spec"]["name"]: r for r in records}
    return [built.get(s.name) or json.loads((out_root / s.name / "task.json").read_text()) for s in specs]


# ------------------------------------------------------------------------------------ using


@dataclass(frozen=True)
class Task:
    """A built task directory and its task.json."""

    dir: Path
    meta: dict = field(repr=False)

    @property
    def name(self) -> str:
        return self.meta["spec"]["name"]

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    @property
    def pool_path(self) -> Path:
        return self.dir / "pool.jsonl.zst"

    @property
    def target_path(self) -> Path:
        return self.dir / "target.jsonl"

    @property
    def heldout_path(self) -> Path:
        return self.dir / "heldout.jsonl"

    def target(self) -> list[dict]:
        return read_jsonl(self.target_path)

    def heldout(self) -> list[dict]:
        return read_jsonl(self.heldout_path)

    def heldout_ids(self) -> list[str]:
        return [str(r["id"]) for r in self.heldout()]


def load_task(task_dir: str | Path) -> Task:
    """The task in `task_dir`, checked to be complete."""
    d = Path(task_dir)
    meta_path = d / "task.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} does not exist: build the task first (benchmarks/build_tasks.py)")
    missing = [f for f in FILES if not (d / f).exists()]
    if missing:
        raise FileNotFoundError(f"task {d} lacks {missing}: rebuild it")
    return Task(dir=d, meta=json.loads(meta_path.read_text()))


def pool_slice(pool_path: str | Path, tokens: int, seed: int) -> list[str]:
    """Texts of a fixed pseudo-random slice of the pool holding about `tokens` tokens.

    Documents are ordered by a hash of (seed, id), so the slice depends only on the ids and the
    seed, never on file order or on any selection.
    """
    keyed = []
    for line in iter_lines(pool_path):
        rec = json.loads(line)
        key = hashlib.blake2b(f"{seed}:{rec['id']}".encode(), digest_size=8).digest()
        keyed.append((key, rec.get("text") or ""))
    keyed.sort(key=lambda kt: kt[0])
    texts = [t for _, t in keyed]
    counts = pl.DataFrame({"text": texts}, schema={"text": pl.String}).select(count_tokens_expr())["text"].to_numpy()
    n = int(np.searchsorted(np.cumsum(counts), tokens, side="left")) + 1
    return texts[:n]


def task_vocab(task: Task, size: int = 50_000, pool_tokens: int = 2_000_000) -> Vocab:
    """The one vocabulary every method of a task is scored with: top words of target + a fixed pool slice."""
    texts = [r.get("text") or "" for r in task.target()]
    texts += pool_slice(task.pool_path, pool_tokens, task.seed)
    return Vocab.build(texts, size)
