# altforge: `make demo` and `make test` each create .venv and install into it on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

# Telemetry off before anything imports prefect; a project-local Prefect home; no model hub.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_HOME ?= $(CURDIR)/.prefect
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

PYTEST_ARGS ?=

.PHONY: help install demo test lint clean

help:
	@echo "make demo   - create .venv, install, run the whole demo recipe on the built-in demo web site"
	@echo "make test   - create .venv, install, run ruff, the import contracts and the tests"

# Reinstalls only when pyproject.toml changes (the stamp is newer otherwise).
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing altforge and its dependencies into $(VENV) ..."
	@$(PY) -m pip install --quiet -e '.[dev]' 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	@touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/altforge demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: lint
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) .prefect .pytest_cache .ruff_cache
