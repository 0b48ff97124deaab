# Fresh machine: `make run` serves the backend, `make test` runs the suite. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 9090

.PHONY: run test worker bench demo clean-venv

# The stamp file is rebuilt whenever requirements.txt changes.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

run: $(VENV)/.installed
	$(PY) -m backend --host $(HOST) --port $(PORT)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

worker: $(VENV)/.installed
	$(PY) -m training.jobs worker

bench: $(VENV)/.installed
	$(PY) -m model.bench

demo: $(VENV)/.installed
	$(PY) -m model.demo --help

clean-venv:
	rm -rf $(VENV)
