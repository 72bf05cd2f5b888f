# quadflow: `make demo` sets up and runs the demo; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup setup-test demo test bench-pool clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# torch==2.13.0 is the CPU wheel; any other torch spec pulls a multi-GB CUDA build.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,influence,bench]'
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

demo: setup
	$(VENV)/bin/quadflow demo

test: setup-test
	$(PY) -m pytest -q

clean:
	rm -rf demo-output .pytest_cache
