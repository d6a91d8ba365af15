# Quick start: `make demo` and `make test` on a fresh machine (only Python and pip needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/stemstream demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks $(wildcard deployments)
	$(BIN)/ruff format --check src tests benchmarks $(wildcard deployments)
	$(BIN)/lint-imports --no-cache

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/sim.py
	$(BIN)/python benchmarks/store.py
	$(BIN)/python benchmarks/plane.py
	$(BIN)/python benchmarks/count.py
	$(BIN)/python benchmarks/analyses.py
	$(BIN)/python benchmarks/turnaround.py
	$(BIN)/python benchmarks/metrics.py --control

clean:
	rm -rf $(VENV) data .pytest_cache
