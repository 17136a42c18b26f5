# duosparse: `make sweep` (the main job) and `make test` do all set-up themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DS := $(VENV)/bin/duosparse
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# Tests and CI read the corpora from ../shared/data unless told otherwise.
export DUOSPARSE_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: help setup setup-dev train sweep ui test test-fast test-under-load bench lint fmt clean
.DEFAULT_GOAL := help

help:  ## this list
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 24

setup: $(STAMP)  ## what the main job needs: the platform and figure export
setup-dev: $(DEV_STAMP)  ## and what the tests, benchmarks and linter need

# Idempotent: re-installs only when the dependency pins or the project metadata change.
# pip's full output (setuptools' notes on editable installs included) goes to
# .venv/install.log and is shown only when an install fails.
INSTALL = $(PIP) install -c constraints.txt >>$(VENV)/install.log 2>&1
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing duosparse and its pinned dependencies into $(VENV) (log: $(VENV)/install.log)"
	@: >$(VENV)/install.log
	@$(PIP) install --upgrade pip >>$(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@$(INSTALL) -e '.[export]' || { cat $(VENV)/install.log; exit 1; }
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	@echo "installing the test, benchmark and lint tools into $(VENV) (log: $(VENV)/install.log)"
	@$(INSTALL) -e '.[export,postgres,dev]' || { cat $(VENV)/install.log; exit 1; }
	touch $(DEV_STAMP)

train: setup  ## one default run (configs/default.yaml), logged to ./mlruns.db
	$(DS) train configs/default.yaml

SPEC ?= sweeps/ptb_quick.yaml
sweep: setup  ## the main job: the quick PTB study on local Ray + ./mlruns.db (resumable)
	$(DS) sweep run $(SPEC) || test $$? -eq 1  # 1: some trials failed; they are listed above
	$(DS) analyze $(SPEC)
	@# the Pareto figures as PNG beside the report on the launch run (needs Chromium; the
	@# report above already holds them, so a machine without it loses nothing else)
	$(DS) export pareto $(SPEC) --format html,png || echo "PNG export skipped: the report above has the figures"

ui: setup  ## MLflow UI on http://127.0.0.1:5000 over ./mlruns.db
	$(DS) ui

# The tests need PostgreSQL and Chromium: .ci/system-packages.sh installs them when missing
# (root), .ci/postgres.sh starts PostgreSQL and prints a URI for a test role.
test: setup-dev  ## the whole test suite (what CI runs; about 20 minutes on 2 cores)
	bash .ci/system-packages.sh
	@export DUOSPARSE_TEST_POSTGRES_URI="$${DUOSPARSE_TEST_POSTGRES_URI:-$$(bash .ci/postgres.sh)}"; \
	$(PY) -m pytest -q

# Unit tests only: no Ray cluster, no PostgreSQL or Chromium, no training of a minute
# (markers `slow` and `system`, pyproject.toml).
test-fast: setup-dev  ## the unit tests, in about 2 minutes
	$(PY) -m pytest -q -m "not slow and not system"

ROUNDS ?= 10
test-under-load: setup-dev  ## the cluster and deployment tests ROUNDS times while every core is kept busy
	bash .ci/system-packages.sh
	@export DUOSPARSE_TEST_POSTGRES_URI="$${DUOSPARSE_TEST_POSTGRES_URI:-$$(bash .ci/postgres.sh)}"; \
	$(PY) tests/under_load.py --rounds $(ROUNDS)

bench: setup-dev  ## speed figures as ratios to baselines measured in the same run (bench.json)
	$(PY) benchmarks/run.py

CODE := platform analysis dashboards tests benchmarks
lint: setup-dev  ## ruff's checks and its formatting, over the code and the tests
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/ruff format --check $(CODE)

fmt: setup-dev  ## format the code and the tests with ruff (make lint checks it)
	$(VENV)/bin/ruff format $(CODE)

include docker/cluster.mk  # cluster-env, cluster-build, cluster-up, cluster-submit, cluster-down

clean:  ## remove the local store, runs and benchmark output
	rm -rf runs mlruns.db mlartifacts bench.json .pytest_cache
