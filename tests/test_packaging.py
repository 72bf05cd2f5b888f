"""The installed package must not claim top-level names another project could own."""
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
