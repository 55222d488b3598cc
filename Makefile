# Two commands do all the set-up on a fresh clone: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | sha1sum | cut -c1-12)

export KEDRO_DISABLE_TELEMETRY := true
# MLflow store: MLFLOW_TRACKING_URI if set, else tracking.uri in conf/<env>/mlflow.yml, else sqlite:///mlflow.db
export PYTHONUNBUFFERED := 1

.PHONY: setup run test test-fast bench viz notebook mlflow-ui lock clean

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[dev]"
	$(BIN)/python -m iis_study.core.solvers.warm || echo "kernel warm-up skipped: they compile on first use"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project with its dev extras

run: setup  ## the whole default study, offline (digits, EfficientNet-Lites and random controls)
	$(BIN)/kedro run

test: setup  ## the whole test suite
	$(BIN)/python -m pytest

test-fast: setup  ## the quick subset for development (tests not marked slow)
	$(BIN)/python -m pytest -m "not slow"

bench: setup  ## benchmarks (scripts, not tests): the heads' and the path's solvers (need a finished `make run`), the Newton head's parts, convex vs adam, convex at ImageNet shape, extraction, sweep speed-up, concept types as one sweep, sweep scale
	@if [ -f data/05_model_input/lite0/concept_draws.safetensors ]; then $(BIN)/python scripts/bench_solvers.py --update docs/performance.md && $(BIN)/python scripts/bench_nested.py --update docs/performance.md && $(BIN)/python scripts/bench_path.py --update docs/performance.md; else echo "bench_solvers.py, bench_nested.py and bench_path.py skipped: run make run first"; fi
	$(BIN)/python scripts/bench_newton_parts.py --update docs/performance.md
	$(BIN)/python scripts/bench_estimators.py --variants
	$(BIN)/python scripts/bench_convex_scale.py --n 20000 50000
	$(BIN)/python scripts/bench_extraction.py
	$(BIN)/python scripts/bench_sweep.py
	$(BIN)/python scripts/bench_concept_types.py
	$(BIN)/python scripts/bench_scale.py --in-memory

viz: setup
	$(BIN)/kedro viz run --host 127.0.0.1

notebook: setup  ## JupyterLab on 127.0.0.1 with the project's kernel (kedro jupyter lab); open notebooks/
	$(BIN)/kedro jupyter lab --ip 127.0.0.1 --no-browser $(if $(filter 0,$(shell id -u)),--allow-root,)

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1

lock: setup  ## after a dependency change: pin the versions now in .venv into requirements.lock
	{ head -2 requirements.lock; $(BIN)/python -m pip freeze --exclude-editable; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:  ## remove computed data (keeps the .venv)
	find data -mindepth 2 ! -name .gitkeep -delete
