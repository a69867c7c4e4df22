# The targets README.md uses. `make run` = set up + the main job; `make test` = the test suite.
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
PYTHON ?= python3
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1
# the run history every way of running shares (pipelines/instance.py uses the same default)
DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: setup run test bench dev clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml  ## what the pipeline needs; the test tools come with `make test`
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: setup  ## the main job: datasets -> models -> evaluation -> report, through DVC (its stages' adpipe calls warm)
	$(BIN)/adpipe warm -- $(BIN)/dvc repro
	@echo "report: $(CURDIR)/data/reports/report.html"

test: $(VENV)/.installed-test  ## one worker per core, the slow real-data tests first
	$(BIN)/python -m pytest -q -n auto --dist loadgroup

bench: setup
	$(BIN)/python bench/bench_methods.py

dev: setup  ## the Dagster UI on http://127.0.0.1:3000, over the run history of `make run` and `adpipe`
	DAGSTER_HOME=$(DAGSTER_HOME) $(BIN)/adpipe instance
	DAGSTER_HOME=$(DAGSTER_HOME) $(BIN)/dagster dev -m pipelines.definitions

clean:
	rm -rf data/datasets data/models data/eval data/reports
