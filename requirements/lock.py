"""The dependency lock: `generate` resolves every distribution quadflow and its extras install into
requirements/lock.txt; `check` fails when a virtual environment holds anything else.

pyproject.toml keeps ranges for people who install quadflow as a library. The Makefile (and so
.ci/run) installs with `pip install -c requirements/lock.txt`, which pins every resolved
distribution, then runs `check`, so a fresh machine gets exactly the set the tests passed with.
pip itself resolves the lock (`pip install --dry-run --report` in a fresh venv), with the same
indexes and find-links the machine's pip configuration names, so the lock is what pip would
install here. Standard library only: it runs before any venv exists.

    python3 requirements/lock.py generate          # `make lock`
    .venv/bin/python requirements/lock.py check    # every installed distribution as locked
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
EXTRAS = "test,influence,bench,dask,ray"  # what `make setup-test` installs
TOOLS = ("pip", "setuptools")  # installer and build backend, pinned like everything else
PROJECT = "quadflow"
# The CPU build of torch is published as 2.13.0+cpu; `torch==2.13.0` matches it (and pip prefers it when
# it is on an index or in find-links), while `==2.13.0+cpu` would fail where only PyPI is reachable.
# The CUDA build's nvidia-* wheels must never enter the lock: they are gigabytes the CPU build does not need.
FORBIDDEN = re.compile(r"^nvidia-|^triton$")
HEADER = """\
# Every distribution `make setup-test` installs, pinned: pip resolved them for CPython {python} on {platform}.
# Regenerate with `make lock` (requirements/lock.py); review the diff, run `make test`, commit both.
# torch==2.13.0 is the CPU wheel (2.13.0+cpu); no nvidia-* package belongs here.
"""


def _name(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _public(version: str) -> str:
    """A version without its local label (2.13.0+cpu -> 2.13.0)."""
    return version.split("+", 1)[0]


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{normalized name: version} of every `name==version` line of the lock."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if m is None:
            raise SystemExit(f"{path}: not a `name==version` line: {line!r}")
        pins[_name(m.group(1))] = m.group(2)
    return pins


def resolve() -> dict[str, str]:
    """{name: version} pip would install for quadflow with every extra, from an empty venv."""
    with tempfile.TemporaryDirectory(prefix="quadflow-lock-") as tmp:
        env_dir = Path(tmp) / "venv"
        venv.create(env_dir, with_pip=True)
        py = str(env_dir / "bin" / "python")
        subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        report = Path(tmp) / "report.json"
        subprocess.run([py, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report),
                        *TOOLS, f"{ROOT}[{EXTRAS}]"], check=True)
        items = json.loads(report.read_text())["install"]
    pins = {}
    for item in items:
        meta = item["metadata"]
        name = _name(meta["name"])
        if name != PROJECT:
            pins[name] = _public(meta["version"]) if name == "torch" else meta["version"]
    return pins


def generate(path: Path = LOCK) -> None:
    pins = resolve()
    bad = sorted(n for n in pins if FORBIDDEN.search(n))
    if bad:
        raise SystemExit(f"the resolution pulls {', '.join(bad)}: torch is not the CPU wheel; is torch==2.13.0+cpu "
                         "reachable (pip config list: find-links / extra-index-url)?")
    import platform

    lines = [HEADER.format(python=platform.python_version(), platform=f"{sys.platform}-{platform.machine()}")]
    lines += [f"{name}=={pins[name]}\n" for name in sorted(pins)]
    path.write_text("".join(lines))
    print(f"wrote {path}: {len(pins)} distributions")


def installed() -> dict[str, str]:
    """{name: version} of every distribution in the running interpreter's environment."""
    from importlib import metadata

    return {_name(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def check(path: Path = LOCK, subset: bool = False) -> list[str]:
    """Differences between this environment and the lock (empty: as locked).

    `subset`: an environment with only some extras installed; everything it holds must still be locked.
    """
    pins, have = read_lock(path), installed()
    have.pop(PROJECT, None)
    problems = []
    for name, version in sorted(have.items()):
        if name not in pins:
            problems.append(f"{name}=={version} is installed but not in {path.name}")
        elif _public(version) != _public(pins[name]):
            problems.append(f"{name}=={version} is installed; {path.name} pins {pins[name]}")
    if not subset:
        problems += [f"{name}=={v} is in {path.name} but not installed" for name, v in sorted(pins.items())
                     if name not in have]
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="requirements/lock.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("generate", help=f"resolve and write {LOCK.relative_to(ROOT)}")
    c = sub.add_parser("check", help="compare the running environment with the lock")
    c.add_argument("--subset", action="store_true", help="only some extras are installed")
    args = p.parse_args(argv)
    if args.command == "generate":
        generate()
        return 0
    problems = check(subset=args.subset)
    for line in problems:
        print(f"lock: {line}", file=sys.stderr)
    if problems:
        print(f"lock: the environment differs from {LOCK}; reinstall with `make setup-test` (or `make lock` if "
              "pyproject.toml changed)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
