# quadflow: `make demo` sets up and runs the demo; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED := false

LOCK := requirements/lock.txt

.PHONY: setup setup-test demo test lock bench-pool bench bench-full clean

# Installs take exactly the versions in $(LOCK) (pyproject.toml keeps ranges for library users);
# `lock.py check` fails if the environment holds anything else.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip setuptools
	$(PY) -m pip install -q -c $(LOCK) -e .
	$(PY) requirements/lock.py check --subset
	touch $@

# torch==2.13.0 is the CPU wheel; any other torch spec pulls a multi-GB CUDA build.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -c $(LOCK) -e '.[test,influence,bench,dask,ray]'
	$(PY) requirements/lock.py check
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

demo: setup
	$(VENV)/bin/quadflow demo

test: setup-test
	$(PY) -m pytest -q

# Resolve every dependency again (newest versions pyproject.toml allows) into $(LOCK); then `make test`.
lock:
	$(PYTHON) requirements/lock.py generate

# Benchmarks (BENCHMARKS.md): `make bench` is the quick version (~30k-document pools, one seed,
# throughput at 10k documents: minutes); `make bench-full` runs the whole 354k-document pool with
# 3 seeds, then throughput at 10k, 100k and 354k documents (an hour or more on 2 cores).
# BENCH_ARGS go to benchmarks.bench, e.g. BENCH_ARGS="--transformer on --tasks python-docs" (the
# transformer second opinion runs by itself only where there is a GPU; on 2 CPU cores it adds
# about 12 s per method run).
BENCH_ARGS ?=
bench: setup-test
	$(PY) -m benchmarks.bench --mode quick $(BENCH_ARGS)
	$(PY) -m benchmarks.throughput --sizes 10000 --out runs/bench/throughput-quick

bench-full: setup-test
	$(PY) -m benchmarks.bench --mode full --seeds 3 $(BENCH_ARGS)
	$(PY) -m benchmarks.throughput

clean:
	rm -rf demo-output .pytest_cache
