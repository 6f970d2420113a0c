# Stormline: the two set-up commands are `make demo` and `make test`.
# Each installs what it needs: system packages (apt-get), a Python venv keyed by
# requirements.lock and kept outside the clone, and the stack's jars (Maven Central, cached).
SHELL := /bin/bash
.DEFAULT_GOAL := help

CACHE   ?= $(HOME)/.cache/stormline
# Any Python that Stormline supports (3.11 or 3.12): make test PYTHON=python3.12
PYTHON  ?= python3
PY_TAG  := $(shell $(PYTHON) -c 'import sys; print("py%d%d" % sys.version_info[:2])' 2>/dev/null)
LOCK_ID := $(PY_TAG)-$(shell sha256sum requirements.lock | cut -c1-16)
VENV    := $(CACHE)/venvs/$(LOCK_ID)
BIN     := .venv/bin
# uv builds the venv (about 10x faster than pip from an empty cache, with per-package progress).
UV_VERSION := 0.13.8
UV      := $(CACHE)/uv-$(UV_VERSION)/bin/uv
export UV_CACHE_DIR ?= $(CACHE)/uv
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
	@PYTHON=$(PYTHON) bash deploy/install-system.sh

$(UV):
	@echo "[setup 1/3] installing uv $(UV_VERSION) into $(CACHE)/uv-$(UV_VERSION)"
	@rm -rf $(CACHE)/uv-$(UV_VERSION) && mkdir -p $(CACHE)
	@$(PYTHON) -m venv $(CACHE)/uv-$(UV_VERSION)
	@$(CACHE)/uv-$(UV_VERSION)/bin/pip install -q uv==$(UV_VERSION)

# No prerequisite on the lock on purpose: the path holds the lock's hash, so a venv is never
# stale, and a fresh clone (all files new) must reuse it rather than rebuild it.
$(VENV)/.complete: | $(UV)
	@[ -n "$(PY_TAG)" ] || { echo "$(PYTHON) not found: set PYTHON=python3.11 or python3.12" >&2; exit 1; }
	@echo "[setup 2/3] creating venv $(VENV) from requirements.lock (first time only: torch and ray are about 3.5 GB)"
	@rm -rf $(VENV) && mkdir -p $(CACHE)/venvs
	@$(UV) venv -q --python $(PYTHON) $(VENV)
	@$(UV) pip install --python $(VENV)/bin/python -r requirements.lock
	@touch $@

SRC_ID = $(CURDIR) $(shell sha256sum pyproject.toml | cut -c1-16)
.venv/.installed: $(VENV)/.complete
	@ln -sfn $(VENV) .venv
	@# The venv is shared by clones of the same lock; point its editable install at this one.
	@[ "$$(cat $(VENV)/.installed-from 2>/dev/null)" = "$(SRC_ID)" ] || { \
	  echo "[setup 3/3] installing this clone into the venv (editable)" && \
	  $(UV) pip install -q --python $(BIN)/python --no-deps --no-build-isolation -e . && \
	  echo "$(SRC_ID)" > $(VENV)/.installed-from; }

lock: | $(UV)  ## re-resolve dependencies from pyproject.toml into requirements.lock
	@$(UV) pip compile -q --python-version 3.11 --extra dev --no-header --no-annotate \
	  -o requirements.lock.new pyproject.toml
	@(echo "# Exact versions for a reproducible venv. Regenerate: make lock"; \
	  cat requirements.lock.new) > requirements.lock && rm requirements.lock.new

.PHONY: help demo test bench lint down setup system lock .venv/.installed
