# quadflow: `make demo` sets up and runs the demo; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup setup-test demo test bench-pool bench bench-full clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# torch==2.13.0 is the CPU wheel; any other torch spec pulls a multi-GB CUDA build.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,influence,bench,dask]'
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

demo: setup
	$(VENV)/bin/quadflow demo

test: setup-test
	$(PY) -m pytest -q

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
