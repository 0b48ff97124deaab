# Fresh machine: `make run` serves the backend, `make test` runs the suite. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 9090
REQUIREMENTS := requirements.txt requirements-runtime.txt requirements-training.txt requirements-test.txt

.PHONY: run test test-fast lint worker bench demo clean-venv

# The stamp file is rebuilt whenever a requirements file changes. requirements.txt is the union
# (runtime + training + test); the Docker images install requirements-training.txt only.
$(VENV)/.installed: $(REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

run: $(VENV)/.installed
	$(PY) -m backend --host $(HOST) --port $(PORT)

# Both tiers: unit and e2e (real Label Studio, Redis, PostgreSQL, browser, real training runs).
# --durations=15: the 15 slowest tests are printed (in CI's output too: .ci/run runs make test).
# -n 2: two test processes (pytest-xdist); the e2e tests mostly wait on servers and subprocesses.
# --dist loadfile: a module's tests run in one process, in order (module fixtures made once; a
# module's Redis db is its own). (loadgroup does not group under pytest 9.2: xdist 3.8 renames
# node ids in a way pytest 9 no longer reads.)
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

# The unit tier only (pytest marker `unit`: everything not marked `e2e`).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15 -m "not e2e" tests

# ruff and mypy, configured in pyproject.toml.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

worker: $(VENV)/.installed
	$(PY) -m backend.jobs worker

bench: $(VENV)/.installed
	$(PY) -m training.bench

demo: $(VENV)/.installed
	$(PY) -m model.demo --help

clean-venv:
	rm -rf $(VENV)
