# Stormline: the two set-up commands are `make demo` and `make test`.
# Each installs what it needs: system packages (apt-get), a Python venv in .venv built by uv from
# requirements.lock (packages hard-linked from uv's cache outside the clone, so a second clone
# costs seconds and no extra disk), and the stack's jars (Maven Central, cached).
SHELL := /bin/bash
.DEFAULT_GOAL := help

CACHE   ?= $(HOME)/.cache/stormline
# Any Python that Stormline supports (3.11 or 3.12): make test PYTHON=python3.12
PYTHON  ?= python3
PY_TAG  := $(shell $(PYTHON) -c 'import sys; print("py%d%d" % sys.version_info[:2])' 2>/dev/null)
LOCK_ID := $(PY_TAG)-$(shell sha256sum requirements.lock | cut -c1-16)
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

lint: setup  ## ruff (lint, format) and mypy (strict on the pure modules)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	@# mypy reads the installed layout through links: stormline/schemas -> schemas/, ...
	@rm -rf .typecheck && mkdir -p .typecheck/stormline
	@for f in stormline/*; do ln -s "$(CURDIR)/$$f" .typecheck/stormline/; done
	@for d in schemas producers consumers streams trainer deploy; do \
	  ln -s "$(CURDIR)/$$d" .typecheck/stormline/$$d; done
	cd .typecheck && ../$(BIN)/mypy --config-file ../pyproject.toml stormline

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

# Each clone has its own venv (an editable install is per clone); the marker names the Python and
# the lock's hash, so a new lock or another PYTHON rebuilds it, and nothing else does.
.venv/.complete-$(LOCK_ID): | $(UV)
	@[ -n "$(PY_TAG)" ] || { echo "$(PYTHON) not found: set PYTHON=python3.11 or python3.12" >&2; exit 1; }
	@echo "[setup 2/3] creating .venv ($(PY_TAG)) from requirements.lock (first time on this machine: torch and ray are about 3.5 GB, cached in $(UV_CACHE_DIR))"
	@rm -rf .venv
	@$(UV) venv -q --python $(PYTHON) .venv
	@$(UV) pip install --python $(BIN)/python -r requirements.lock
	@touch $@

SRC_ID = $(shell sha256sum pyproject.toml | cut -c1-16)
.venv/.installed: .venv/.complete-$(LOCK_ID)
	@[ "$$(cat .venv/.installed-from 2>/dev/null)" = "$(SRC_ID)" ] || { \
	  echo "[setup 3/3] installing this clone into .venv (editable)" && \
	  $(UV) pip install -q --python $(BIN)/python --no-deps --no-build-isolation -e . && \
	  echo "$(SRC_ID)" > .venv/.installed-from; }

lock: | $(UV)  ## re-resolve pyproject.toml into requirements.lock, keeping pins that still fit
	@grep -v '^#' requirements.lock > requirements.lock.new
	@$(UV) pip compile -q --python-version 3.11 --extra dev --no-header --no-annotate \
	  -o requirements.lock.new pyproject.toml
	@(echo "# Exact versions for a reproducible venv. Regenerate: make lock"; \
	  cat requirements.lock.new) > requirements.lock && rm requirements.lock.new

.PHONY: help demo test bench lint down setup system lock .venv/.installed
