# Experiment and tuning toolkit. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# GPU=1 installs the CUDA build of TensorFlow; later targets keep whichever build was installed last.
GPU ?= $(if $(wildcard $(VENV)/.installed-cuda),1,0)
# One stamp per TensorFlow build, so that `make install GPU=1` on a CPU install (or GPU=0 back) re-runs.
STAMP := $(VENV)/.installed$(if $(filter 1,$(GPU)),-cuda,)
EXP ?= quickstart
# The UI without MLflow's job runner (its ~8 huey consumers serve GenAI jobs, not trial tracking),
# on two web workers instead of four. tests/test_ui.py starts it the same way.
UI_ENV = MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
UI_ARGS = --workers 2
SET ?=
WORKERS ?= 0
PORT ?= 5000
PYTEST_ARGS ?=

SET_ARGS := $(foreach kv,$(SET),--set $(kv))
WORKER_ARGS := $(if $(filter-out 0,$(WORKERS)),--workers $(WORKERS),)

.DEFAULT_GOAL := help
.PHONY: constraints help install postgres tune validate ui serve test test-all lint format bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'
	@echo "  variables: EXP=<card or path> SET=\"k=v ...\" WORKERS=N PORT=5000 GPU=1"

install: $(STAMP) ## create .venv with the project and its dev extras (GPU=1: CUDA TensorFlow)

# Re-runs when pyproject.toml changes or GPU= asks for the other TensorFlow build.
# tensorflow-cpu and tensorflow install into the same package folder, so both are uninstalled
# before either is installed (uninstalling one would delete files of the other), and the CUDA
# build gets the same version as the CPU build that pyproject.toml resolved to.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]" -c constraints.txt
	@version=$$($(BIN)/python -c "from importlib.metadata import version; print(version('tensorflow-cpu'))"); \
	if [ "$(GPU)" = "1" ]; then \
	  echo "installing tensorflow[and-cuda]==$$version in place of tensorflow-cpu"; \
	  $(BIN)/python -m pip uninstall --quiet -y tensorflow-cpu tensorflow && \
	  $(BIN)/python -m pip install --quiet "tensorflow[and-cuda]==$$version"; \
	elif $(BIN)/python -m pip show --quiet tensorflow >/dev/null 2>&1; then \
	  echo "installing tensorflow-cpu==$$version in place of the CUDA build"; \
	  $(BIN)/python -m pip uninstall --quiet -y tensorflow tensorflow-cpu && \
	  $(BIN)/python -m pip install --quiet "tensorflow-cpu==$$version"; fi
	@rm -f $(VENV)/.installed $(VENV)/.installed-cuda
	@touch $(STAMP)

constraints: install ## re-pin constraints.txt to what .venv holds now (after a tested upgrade)
	@{ sed -n '1,2p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '@ file'; } > constraints.tmp && mv constraints.tmp constraints.txt

# Debian's server package keeps initdb off PATH, under /usr/lib/postgresql/<version>/bin.
PG_INITDB = $(or $(shell command -v initdb 2>/dev/null),$(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb)))
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)

postgres: install ## PostgreSQL's server (apt, if no initdb) and the postgres extra, for tests/test_postgres.py
	@if [ -z "$(PG_INITDB)" ]; then \
	  echo "installing Debian's PostgreSQL server (apt-get install postgresql)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql; \
	else echo "PostgreSQL's server: $(PG_INITDB)"; fi
	$(BIN)/python -m pip install --quiet -e ".[postgres]" -c constraints.txt

tune: install ## run a search: make tune EXP=quickstart [SET="train.epochs=5"] [WORKERS=2]
	TOOLKIT_UI_PORT=$(PORT) $(BIN)/toolkit tune $(EXP) $(SET_ARGS) $(WORKER_ARGS)

validate: install ## check a card without training: make validate EXP=quickstart
	$(BIN)/toolkit validate $(EXP) $(SET_ARGS)

ui: install ## MLflow UI over the default store on 127.0.0.1:$(PORT)
	@mkdir -p mlruns
	$(UI_ENV) $(BIN)/mlflow ui $(UI_ARGS) --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port $(PORT)

serve: install ## serve models:/$(EXP)@champion over HTTP on 127.0.0.1:$(or $(SERVE_PORT),5001)
	PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///mlruns/mlflow.db} \
	  $(BIN)/mlflow models serve -m "models:/$(EXP)@champion" --env-manager local --host 127.0.0.1 --port $(or $(SERVE_PORT),5001)

test: install ## fast tests (under 10 minutes)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: install ## every test, slow end-to-end ones included
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install ## ruff check and format check
	$(BIN)/ruff check toolkit tests benchmarks
	$(BIN)/ruff format --check toolkit tests benchmarks

format: install ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix toolkit tests benchmarks
	$(BIN)/ruff format toolkit tests benchmarks

bench: install ## every performance figure, measured side by side (see benchmarks/RESULTS.md)
	$(BIN)/python benchmarks/run_all.py

clean: ## remove the environment, caches and the local MLflow store
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info benchmarks/out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find mlruns -mindepth 1 ! -name .gitkeep -exec rm -rf {} + 2>/dev/null || true
