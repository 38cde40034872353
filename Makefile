# The README's two commands: `make run` and `make test`. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Offline by default: no telemetry, no hub downloads.
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE ?= 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90

.PHONY: setup run test test-fast lint fmt bench repro ui lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "error: Python 3.11+ not found (PYTHON=$(PYTHON)); install it or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

run: setup
	$(BIN)/lmpipe run

# Two workers (the machine's 2 cores); each test file stays on one worker, so the timing-sensitive
# fault tests run in order among themselves while the rest of the suite runs beside them.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: setup lint
	$(PYTEST)

# ruff: pycodestyle, pyflakes, import order, bugbear (settings in pyproject.toml). `make fmt` applies
# the fixes ruff can make safely (import order, most of all); long lines are wrapped by hand.
lint: setup
	$(BIN)/ruff check .

fmt: setup
	$(BIN)/ruff check --fix .

test-fast: setup
	$(PYTEST) -m "not slow"

bench: setup
	$(BIN)/python -m bench

repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The MLflow UI on the local store, opened on the runs of params.yaml's experiment (marked as model
# training, so MLflow 3 shows its runs rather than the GenAI overview).
ui: setup
	@MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/mlruns/mlflow.db $(BIN)/python -c 'from lmpipe import \
	tracking; from lmpipe.config import load_config; \
	print("runs:", tracking.runs_url(tracking.setup(load_config().tracking.experiment)))'
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1 --port 5000

lock:  # re-freeze the environment into constraints.txt, keeping its header comments
	{ grep '^#' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf outputs checkpoints data/prepared data/tokenizer
