"""Shared fixtures: a tiny project in a temporary directory, and one Prefect test harness per
session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

# One torch thread in each test process and every process it starts, set before torch is imported
# (its OpenMP runtime reads this once): two workers on two cores, each with training subprocesses
# beside it, thrash with more threads than cores. Tiny models lose nothing: a 300-step fault run
# took 12-18 s with one thread and 22-38 s with two on the shared 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from lmpipe.common.env import apply_offline_defaults  # noqa: E402
from lmpipe.config import ENV_VARS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: lmpipe, dvc

apply_offline_defaults()

TOPICS = ["the neighbour's hedge", "my sister's wedding", "a borrowed lawnmower",
          "the office kettle",
          "our noisy parrot", "a forgotten birthday", "the book club", "my brother's loan",
          "the allotment shed", "a holiday rota", "the choir solo", "a dog called Biscuit"]


def tiny_corpus() -> str:
    """A small advice-column corpus (12 letters, ~4 KB) with the bundled corpus's markdown shape."""
    letters = []
    for i, topic in enumerate(TOPICS):
        letters.append(
            f"## About {topic}\n\nDear Agnes,\n\nI have a problem with {topic}. It started in "
            f"spring and it has not stopped. What should I do about {topic}?\n\n— Worried in Town "
            f"{i}\n\n**Agnes replies:** Dear Worried, talk to them kindly about {topic}, and then "
            "let it go. Most trouble shrinks when it is named out loud.\n")
    return "# Dear Agnes\n\n" + "\n".join(letters)


_TINY = {
    "data": {"source": "data/corpus.md", "val_fraction": 0.2, "seed": 1},
    "tokenizer": {"kind": "char", "vocab_size": 300},
    "model": {"type": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16,
              "dropout": 0.0},
    "train": {"steps": 20, "batch_size": 4, "lr": 0.01, "min_lr": 0.001, "warmup_steps": 2,
              "eval_interval": 10, "eval_batches": 2, "log_interval": 5, "seed": 7,
              "device": "cpu"},
    "checkpoint": {"enabled": True, "interval": 10, "dir": "checkpoints"},
    "evaluate": {"batch_size": 8, "max_batches": 4},
    "generate": {"prompt": "Dear Agnes,", "max_new_tokens": 20, "device": "cpu"},
    "tracking": {"experiment": "lmpipe-test"},
}
# The repo's params.yaml with tiny values: every key DVC tracks is present.
TINY_PARAMS = {section: {**values, **_TINY.get(section, {})}
               for section, values in yaml.safe_load((REPO / "params.yaml").read_text()).items()}


def lay_out_tiny_project(root: Path) -> Path:
    """The tiny project's files in `root`: data/corpus.md and params.yaml (TINY_PARAMS)."""
    (root / "data").mkdir()
    (root / "data" / "corpus.md").write_text(tiny_corpus(), encoding="utf-8")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    return root


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A tiny project directory (params.yaml + corpus) as the working directory, with its own
    MLflow SQLite store and none of the seed's environment variables set."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    lay_out_tiny_project(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (tmp_path / "mlruns").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for lmpipe subprocesses: the venv first on PATH, no seed variables."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
