# make run   : create .venv if missing, install lmforge, run the pipeline (dvc repro)
# make test  : create .venv if missing, install lmforge with its test extras, lint (ruff), run the whole suite
# make test-fast : the unit tier only (tests/unit)
# make ui    : the MLflow UI on http://127.0.0.1:5000 over mlflow.db
# make docs  : build the documentation site (docs/, mkdocs.yml) into site/, strict and offline
# make docs-serve : the site on http://127.0.0.1:8001, rebuilt as docs/ changes

VENV   ?= .venv
PYTHON ?= python3
# Without a GPU, torch 2.13.0 resolves to the CPU build on our machines (a local wheel); an unpinned
# torch would pull a 6 GB CUDA build. GPU users: `make install TORCH=torch` for the CUDA build.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH  ?= $(if $(HAS_GPU),torch,torch==2.13.0)
TORCH_FLAGS ?=

# llama-cpp-python (test extra) has no wheel on PyPI, only a source archive that takes about 20 minutes
# to build: the tests install a prebuilt wheel from ../shared/wheels (beside a CI clone) or
# /work/shared/wheels, and refuse to build it (--only-binary). Another folder: `make test WHEELS=DIR`.
WHEELS ?= $(firstword $(wildcard ../shared/wheels /work/shared/wheels))

BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install install-test install-docs run test test-fast docs docs-serve ui serve bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_FLAGS) "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	@test -n "$(WHEELS)" || { echo "error: no folder of prebuilt wheels for llama-cpp-python (looked in ../shared/wheels and /work/shared/wheels); set WHEELS=DIR to a folder holding its wheel, as building it from source takes about 20 minutes." >&2; exit 1; }
	$(BIN)/pip install --quiet --find-links "$(WHEELS)" --only-binary llama-cpp-python -e ".[test]"
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[docs]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-docs: $(VENV)/.installed-docs

run: install
	dvc repro

# Two pytest workers (pytest-xdist), a module each at a time (--dist loadscope: a module's fixtures are
# built once): a serial run keeps about one core busy (its tests wait on subprocesses, servers, DVC),
# so two workers halve the wall time on 2 cores (docs/architecture.md, "Test tiers").
test: install-test
	ruff check src tests pipelines benchmarks
	python -m pytest -q -n 2 --dist loadscope

# The unit tier only (tests/unit: no training, no subprocess, no server): well under a minute on 2 cores.
test-fast: install-test
	ruff check src tests pipelines benchmarks
	python -m pytest -q tests/unit

# Material for MkDocs prints a notice about MkDocs 2.0 on every run; NO_MKDOCS_2_WARNING silences it.
docs: install-docs
	NO_MKDOCS_2_WARNING=true mkdocs build --strict

docs-serve: install-docs
	NO_MKDOCS_2_WARNING=true mkdocs serve --strict --dev-addr 127.0.0.1:8001

ui: install
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///mlflow.db --workers 1 --host 127.0.0.1 --port 5000

# The pipeline's model (paths.model) behind the OpenAI API on http://127.0.0.1:8000/v1
serve: install
	lmforge serve --model $$(python -c "import yaml; print(yaml.safe_load(open('params.yaml'))['paths']['model'])")

bench: install-test
	python benchmarks/train_throughput.py

clean:
	rm -rf data models reports mlflow.db mlartifacts site
