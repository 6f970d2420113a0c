# Stormline: the two set-up commands are `make demo` and `make test`.
# Each installs what it needs: system packages (apt-get), a Python venv keyed by
# requirements.lock and kept outside the clone, and the stack's jars (Maven Central, cached).
SHELL := /bin/bash
.DEFAULT_GOAL := help

CACHE   ?= $(HOME)/.cache/stormline
PYTHON  ?= python3
LOCK_ID := $(shell sha256sum requirements.lock | cut -c1-16)
VENV    := $(CACHE)/venvs/$(LOCK_ID)
BIN     := .venv/bin
export PIP_CACHE_DIR ?= $(CACHE)/pip
export PIP_DISABLE_PIP_VERSION_CHECK = 1

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

demo: setup  ## the whole loop: stack, services, demo tasks, live progress, analytics
	$(BIN)/stormline demo $(DEMO_ARGS)

test: setup  ## run the test suite against a real stack that pytest starts
	$(BIN)/pytest -q

bench: setup  ## run the benchmark suite; writes bench/results.md and bench/results.json
	$(BIN)/stormline up
	$(BIN)/python -m bench $(BENCH_ARGS)

lint:  ## ruff check and format check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

down:  ## stop the embedded stack
	$(BIN)/stormline down

setup: system .venv/.installed  ## install everything (quiet and quick when already done)

system:
	@bash deploy/install-system.sh

# No prerequisite on purpose: the path holds the lock's hash, so a venv is never stale, and a
# fresh clone (all files new) must reuse it rather than rebuild it.
$(VENV)/.complete:
	@echo "creating venv $(VENV) (first time only: torch and ray are large)"
	@rm -rf $(VENV) && mkdir -p $(CACHE)/venvs
	@$(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/pip install -q -r requirements.lock
	@touch $@

SRC_ID = $(CURDIR) $(shell sha256sum pyproject.toml | cut -c1-16)
.venv/.installed: $(VENV)/.complete
	@ln -sfn $(VENV) .venv
	@# The venv is shared by clones of the same lock; point its editable install at this one.
	@[ "$$(cat $(VENV)/.installed-from 2>/dev/null)" = "$(SRC_ID)" ] || { \
	  $(BIN)/pip install -q --no-deps --no-build-isolation -e . >/dev/null && \
	  echo "$(SRC_ID)" > $(VENV)/.installed-from; }

lock:  ## re-resolve dependencies from pyproject.toml into requirements.lock
	@rm -rf $(CACHE)/lock-venv && $(PYTHON) -m venv $(CACHE)/lock-venv
	@$(CACHE)/lock-venv/bin/pip install -q ".[dev]"
	@(echo "# Exact versions for a reproducible venv. Regenerate: make lock"; \
	  $(CACHE)/lock-venv/bin/pip freeze | grep -v -E '^(stormline|-e )') > requirements.lock

.PHONY: help demo test bench lint down setup system lock .venv/.installed
