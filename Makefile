# Two entry points: `make demo` (main job on the built-in data) and `make test`.
# `make test` checks the layer contract (import-linter, pyproject.toml) before the tests.
# Both create .venv on first use: torch==2.13.0 first (CPU wheel), then the package with its dev extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python launch.py sweeps/rank_search.yaml

test: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest
