# Two commands do all the set-up on a fresh machine:
#   make run    -> builds .venv (torch CPU first, then the project) and runs the main graph
#   make test   -> builds .venv, runs ruff and the test suite
#   make bench  -> runs every benchmark script and rewrites bench/RESULTS.md
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MAIN_GRAPH ?= graphs/full_opd.yaml
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test bench clean-runs

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[miniworld,test]'
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/python runner.py $(MAIN_GRAPH)

test: setup   # lint (ruff, configured in pyproject.toml), then the suite
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: setup   # every benchmark script; rewrites bench/RESULTS.md (a few minutes on 2 cores)
	$(BIN)/python bench/run_all.py

clean-runs:
	rm -rf runs
