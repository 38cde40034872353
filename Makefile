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

.PHONY: setup run test test-fast lint fmt bench repro ui serve serve-model mlflow-server lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "error: Python 3.11+ not found (PYTHON=$(PYTHON)); install it or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,postgres]"
	@touch $(STAMP)

run: setup
	$(BIN)/lmpipe run

# Two workers (the machine's 2 cores); each test file stays on one worker, so the timing-sensitive
# fault tests of tests/test_faults.py run in order among themselves while the rest of the suite
# runs beside them (the longest of them, the random kills, has a file of its own to balance them).
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

# A DVC remote: the stage outputs `make repro` cached, pushed and pulled (scripts/dvc_remote.py
# checks the remote first). The default is a directory outside the repo, per user and content-
# addressed, so every clone on this machine can share it; it goes to .dvc/config.local (a path on
# this machine only). DVC_REMOTE=s3://bucket/path (or gs://, ssh://) makes a team's remote the
# project's default in .dvc/config instead: commit that; credentials go to config.local (README).
DVC_REMOTE ?= $(or $(XDG_DATA_HOME),$(HOME)/.local/share)/lmpipe/dvc-remote
.PHONY: dvc-remote dvc-push dvc-pull
dvc-remote: setup
	$(BIN)/python scripts/dvc_remote.py add "$(DVC_REMOTE)"

dvc-push: setup
	$(BIN)/python scripts/dvc_remote.py push

dvc-pull: setup
	$(BIN)/python scripts/dvc_remote.py pull

# The MLflow UI on the local store, opened on the runs of params.yaml's experiment (marked as model
# training, so MLflow 3 shows its runs rather than the GenAI overview).
ui: setup
	@MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/mlruns/mlflow.db $(BIN)/python -c 'from lmpipe import \
	tracking; from lmpipe.config import load_config; \
	print("runs:", tracking.runs_url(tracking.setup(load_config().tracking.experiment)))'
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1 --port 5000

# A Prefect server on 127.0.0.1:$(SERVE_PORT), the lmpipe-local pool, prefect.yaml's deployments
# and one worker; it prints the UI address and a `prefect deployment run` line. Ctrl-C stops all.
SERVE_PORT ?= 4200
serve: setup
	$(BIN)/python scripts/serve.py --port $(SERVE_PORT)

# POST /invocations on a registered version: MODEL=models:/<name>/<version> or models:/<name>@<alias>
# (default: the champion of the model `lmpipe run` registers for params.yaml); HOST, PORT.
serve-model: HOST ?= 127.0.0.1
serve-model: PORT ?= 5001
serve-model: setup
	$(BIN)/lmpipe serve $(MODEL) --host $(HOST) --port $(PORT)

# A tracking server for several users or machines (scripts/mlflow_server.py): runs and models in a
# database, artifacts stored by the server and reached through it (mlflow-artifacts:/, so clients
# need no access to its disk), all under $(MLFLOW_SERVER_DIR)/. DB=sqlite: one file, nothing to
# install. DB=postgres: a PostgreSQL server of its own from the binaries on PATH (initdb once into
# $(MLFLOW_SERVER_DIR)/postgres, on 127.0.0.1:$(PGPORT) or another free port), stopped with it.
# Point lmpipe at it with `export MLFLOW_TRACKING_URI=http://$(HOST):$(PORT)`. Ctrl-C stops all.
mlflow-server: HOST ?= 127.0.0.1
mlflow-server: PORT ?= 5000
DB ?= sqlite
PGPORT ?= 5432
MLFLOW_SERVER_DIR ?= mlflow-server

mlflow-server: setup
	@case "$(DB)" in sqlite|postgres) ;; *) echo "error: DB=$(DB) is not supported; use DB=sqlite or DB=postgres" >&2; exit 2;; esac
	$(BIN)/python scripts/mlflow_server.py --db $(DB) --dir $(MLFLOW_SERVER_DIR) \
		--host $(HOST) --port $(PORT) --pg-port $(PGPORT)

lock:  # re-freeze the environment into constraints.txt, keeping its header comments
	{ grep '^#' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf outputs checkpoints data/prepared data/tokenizer
