"""The installed package must not claim top-level names another project could own."""
import os
import subprocess
import sys
import textwrap


def test_importing_every_quadflow_module_loads_no_top_level_tasks_or_flows(tmp_path):
    # Run from an empty directory so the repository's own tasks/ and flows/ folders are not on
    # sys.path: only what the installed quadflow package provides can be imported.
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        import quadflow
        names = []
        def walk(package):
            for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
                names.append(info.name)
                if info.name != "quadflow.cli":
                    module = importlib.import_module(info.name)
                    if info.ispkg:
                        walk(module)
        walk(quadflow)
        # tasks/ and flows/ live at the top of the repository but install as quadflow.tasks and
        # quadflow.flows (an editable install maps them, so iter_modules above does not list them)
        for name in ("quadflow.tasks", "quadflow.flows"):
            if name not in names:
                names.append(name)
                walk(importlib.import_module(name))
        # the command-line module is a leaf: nothing else in the package imports it
        assert "quadflow.cli" not in sys.modules
        importlib.import_module("quadflow.cli")
        clash = sorted(m for m in sys.modules if m.split(".")[0] in ("tasks", "flows", "sql"))
        assert not clash, clash
        assert "quadflow.tasks.select" in names and "quadflow.flows.curate" in names, names
        print(len(names))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip()) > 20


def test_sql_files_ship_inside_the_package():
    from quadflow.store import SQL_DIR
    assert (SQL_DIR / "schema.sql").exists() or any(SQL_DIR.glob("*.sql")), SQL_DIR


def test_the_wheel_puts_only_quadflow_in_site_packages_and_its_command_runs(tmp_path):
    import shutil
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # setuptools builds in the source tree: build a copy, leave the repository alone
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(repo / name, src / name)
    for name in ("quadflow", "tasks", "flows", "sql"):
        shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("quadflow-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    top = sorted(p.name for p in site.iterdir() if p.name != "bin")
    assert top == ["quadflow", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"], top
    assert {"tasks", "flows", "sql"} <= {p.name for p in (site / "quadflow").iterdir()}
    assert not list((site / "quadflow").glob("**/bench*.py"))  # benchmark drivers live in benchmarks/, unshipped
    entry = next(site.glob("quadflow-*.dist-info")).joinpath("entry_points.txt").read_text()
    assert "quadflow = quadflow.cli:main" in entry
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", "import quadflow.cli, quadflow.tasks.ingest as i; print(i.__file__); "
                           "raise SystemExit(quadflow.cli.main(['run', '--input', 'x', '--show-settings']))"],
                          cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == str(site / "quadflow" / "tasks" / "ingest.py")
    assert '"budget_tokens": 1000000' in proc.stdout
