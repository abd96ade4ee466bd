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

# make exits 2 whenever a recipe fails ("Error N" names the runner's code N), and dies of the signal itself when
# it got one (Ctrl-C at a terminal: after the runner's checkpoint, the shell sees 130). So the recipe prints the
# runner's code and what it means; scripts call `$(BIN)/python runner.py GRAPH` for the code itself.
run: setup
	@echo "$(BIN)/python runner.py $(MAIN_GRAPH)"; $(BIN)/python runner.py $(MAIN_GRAPH); code=$$?; \
	case $$code in 0) ;; \
	  1) echo "make run: runner.py exited with 1: a node failed" >&2 ;; \
	  2) echo "make run: runner.py exited with 2: the graph is invalid" >&2 ;; \
	  130|143) echo "make run: runner.py exited with $$code: stopped by a signal after its checkpoint;" \
	    "run it again to resume" >&2 ;; \
	  *) echo "make run: runner.py exited with $$code" >&2 ;; \
	esac; \
	[ $$code -eq 0 ] || echo "make run: (make itself exits 2; for the runner's own exit code run" \
	  "$(BIN)/python runner.py $(MAIN_GRAPH))" >&2; \
	exit $$code

test: setup   # lint (ruff, configured in pyproject.toml), then the suite
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: setup   # every benchmark script; rewrites bench/RESULTS.md (a few minutes on 2 cores)
	$(BIN)/python bench/run_all.py

clean-runs:
	rm -rf runs
