# headswap: `make run` runs the pipeline on the bundled data; `make test` runs the test suite.
# Each target installs what it needs into .venv first (Python 3.11, pip: this machine's torch
# wheels are for 3.11 and pip is what finds them).

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# This machine's pip configuration warns once per package about unused index folders: hide that.
PIP_NOISE := grep -v "^WARNING: Location .* is ignored" || true
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# The ephemeral Prefect server migrates a fresh database on first start: slow on a busy 2-core box.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export PREFECT_LOGGING_LEVEL ?= WARNING
export DO_NOT_TRACK := 1

.PHONY: install run repro test test-slow ui bench lint clean

$(STAMP): pyproject.toml
	@echo ">> creating $(VENV) and installing headswap (first time: a few minutes; torch is large)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip 2>&1 | { $(PIP_NOISE); }
	@$(PY) -m pip install --quiet -e '.[dev]' 2>&1 | { $(PIP_NOISE); }
	@touch $(STAMP)

install: $(STAMP)

run: install  ## Full pipeline on ELPV through the Prefect flow (DVC stages, MLflow registry)
	@$(PY) -m flows.pipeline

repro: install  ## dvc repro that waits for another run's workspace lock instead of failing
	@$(VENV)/bin/headswap repro

ui: install  ## Prefect UI :4200 + MLflow UI :5000 + the train/promote/predict deployments (Ctrl-C stops them)
	@$(VENV)/bin/headswap ui

test: install  ## Fast suite: unit + integration on small real data (no slow/gpu tests)
	@$(PY) -m pytest -m "not slow and not gpu" -q

test-slow: install  ## Slow suite: real servers, real browser, full ELPV
	@$(PY) -m pytest -m "slow and not gpu" -q || [ $$? -eq 5 ]  # 5 = none collected

bench: install  ## Features-stage benchmark on ELPV: params.yaml's body + a Lite0 reference -> benchmarks/results/features.json (about 20 min on 2 quiet cores)
	@test -d data/raw || $(VENV)/bin/headswap ingest
	@$(PY) benchmarks/features.py --raw data/raw --out benchmarks/results/features.json

lint: install
	@$(VENV)/bin/ruff check src flows tests benchmarks && $(VENV)/bin/ruff format --check src flows tests benchmarks

clean:  ## Remove pipeline outputs (keeps .venv, the DVC cache and the feature cache)
	rm -rf data/prepared data/features models reports mlflow.db mlartifacts
