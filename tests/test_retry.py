"""The training task's retries: each attempt is a real child process; a retry continues the same
MLflow run from that run's newest verified checkpoint, never another run's; a stop or bad input is
not retried."""
import json
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from prefect import flow
from prefect.states import Failed

from lmpipe import stages
from lmpipe.ckpt.manifest import read_manifest
from lmpipe.ckpt.store import (
    checkpoint_filename,
    list_checkpoints,
    load_checkpoint,
    parse_filename,
    save_checkpoint,
)
from lmpipe.common.fileio import file_sha256
from lmpipe.config import load_config
from lmpipe.train import attempts
from tasks.train import _crashed, train_model


def _plant(directory: Path, run_id: str, step: int, when=datetime(2020, 1, 1)) -> Path:
    """A verified checkpoint (manifest entry) of `run_id` at `step`; not a trainable one."""
    path = directory / checkpoint_filename("gpt", "corpus", step, when)
    save_checkpoint(path, {"model_state_dict": {"w": torch.full((2,), float(step))}, "step": step,
                           "run_id": run_id, "metrics": {}})
    return path


def test_a_retry_resumes_its_own_runs_newest_verified_checkpoint(tmp_path):
    ckpts, attempt = tmp_path / "checkpoints", tmp_path / "attempt"
    config = {"checkpoint": {"dir": str(ckpts)}, "train": {"steps": 60, "resume": ""}}
    first = _plant(ckpts, "mine", 10, datetime(2026, 1, 1, 0, 0, 1))
    corrupt = _plant(ckpts, "mine", 20, datetime(2026, 1, 1, 0, 0, 2))
    corrupt.write_bytes(corrupt.read_bytes()[:-8])  # truncated after the save
    _plant(ckpts, "another-run", 50)  # a later step of another run in the same directory

    assert attempts.attempt_config(config, attempt) == config  # no earlier attempt: as given
    attempts.record_run_id(attempt, "mine")
    resumed = attempts.attempt_config(config, attempt)
    assert resumed["train"] == {"steps": 60, "resume": str(first)}
    assert resumed["checkpoint"] == config["checkpoint"] and config["train"]["resume"] == ""
    attempts.record_run_id(attempt, "died-before-its-first-checkpoint")
    assert attempts.attempt_config(config, attempt) == config  # from the start


def test_only_a_crash_is_retried(tmp_path):
    crash = attempts.failure(-signal.SIGKILL, tmp_path)
    assert isinstance(crash, attempts.TrainingCrashed) and "SIGKILL" in str(crash)
    assert isinstance(attempts.failure(1, tmp_path), attempts.TrainingCrashed)  # a traceback
    for code, exit_code in ((-signal.SIGTERM, 143), (130, 130)):  # a stop before/without a save
        stop = attempts.failure(code, tmp_path)
        assert isinstance(stop, attempts.TrainingFailed) and stop.exit_code == exit_code
    attempts.record_error(tmp_path, attempts.TrainingFailed("train.steps is wrong", 2))
    bad = attempts.failure(2, tmp_path)
    assert (str(bad), bad.exit_code, bad.prefix) == ("train.steps is wrong", 2, "error: ")

    assert _crashed(None, None, Failed(data=crash))
    assert not _crashed(None, None, Failed(data=bad))
    assert not _crashed(None, None, Failed(data=ValueError("a bug in the task")))


class Killer(threading.Thread):
    """SIGKILLs the training process of checkpoint.dir `directory` once its run has a checkpoint
    at `step` or later; records the run and its newest checkpoint file at that moment."""

    def __init__(self, directory: str, step: int):
        super().__init__(daemon=True)
        self.directory, self.step, self.done = directory, step, threading.Event()
        self.run_id = self.newest = None

    def run(self):
        while not self.done.is_set():
            attempt = self._attempt()
            run_id = attempts.recorded_run_id(attempt) if attempt else None
            steps = [e["step"] for e in read_manifest(self.directory).values()
                     if run_id and e["run_id"] == run_id]
            if steps and max(steps) >= self.step:
                self._kill(attempt)
                self.run_id = run_id
                self.newest = max(parse_filename(p)["step"] for p in list_checkpoints(
                    self.directory) if read_manifest(self.directory)[p.name]["run_id"] == run_id)
                return
            time.sleep(0.005)

    def _attempt(self) -> Path | None:
        for request in attempts.ATTEMPTS.glob(f"*/{attempts.REQUEST}"):
            if json.loads(request.read_text())["config"]["checkpoint"]["dir"] == self.directory:
                return request.parent
        return None

    def _kill(self, attempt: Path) -> None:
        for p in psutil.Process().children(recursive=True):
            if str(attempt) in " ".join(p.cmdline()):
                p.send_signal(signal.SIGKILL)


def _losses(run_id: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for m in mlflow.MlflowClient().get_metric_history(run_id, "train_loss"):
        assert out.setdefault(m.step, m.value) == m.value, f"step {m.step} logged twice, unequal"
    return out


@pytest.mark.slow
def test_killed_training_is_retried_and_resumes_the_same_run_bit_exact(project, prefect_harness):
    over = ["train.steps=40", "checkpoint.interval=10", "train.eval_interval=10",
            "train.log_interval=1"]
    cfg = load_config("params.yaml", over)
    stages.prepare(cfg), stages.build_tokenizer(cfg)
    planted = _plant(project / "run", "another-run", 50)
    planted_sha = file_sha256(planted)
    killer = Killer("run", step=20)
    killer.start()

    @flow
    def two_trainings():  # an uninterrupted reference beside the one that is killed
        fast = train_model.with_options(retry_delay_seconds=0)
        ref = fast.submit(load_config("params.yaml", [*over, "checkpoint.dir=ref"]).to_dict())
        run = fast.submit(load_config("params.yaml", [*over, "checkpoint.dir=run"]).to_dict())
        return ref.result(), run.result()

    try:
        ref, run = two_trainings()
    finally:
        killer.done.set()
    assert killer.run_id and 10 <= killer.newest < 40, "the first attempt was not killed mid-run"

    # the retry continued the killed attempt's MLflow run from its newest checkpoint ...
    final = load_checkpoint(run["checkpoint"])
    assert run["run_id"] == killer.run_id == final["run_id"] and run["step"] == final["step"] == 40
    tags = mlflow.get_run(run["run_id"]).data.tags
    assert mlflow.get_run(run["run_id"]).info.status == "FINISHED"
    assert tags[f"lmpipe.resume.step{killer.newest}"].startswith("run/")
    # ... to the same weights and optimizer state as the uninterrupted run, step by step
    expected = load_checkpoint(ref["checkpoint"])
    for k, v in expected["model_state_dict"].items():
        assert torch.equal(v, final["model_state_dict"][k]), k
    for i, st in expected["optimizer_state_dict"]["state"].items():
        assert all(torch.equal(v, final["optimizer_state_dict"]["state"][i][k])
                   for k, v in st.items())
    assert _losses(run["run_id"]) == _losses(ref["run_id"])
    assert sorted(_losses(run["run_id"])) == list(range(1, 41))
    # another run's later checkpoint in the same directory was left alone
    assert file_sha256(planted) == planted_sha
    assert read_manifest(project / "run")[planted.name]["run_id"] == "another-run"
    assert not list(attempts.ATTEMPTS.iterdir())  # both attempts' directories went
    assert json.loads((project / "outputs/train.json").read_text())["run_id"] in (ref["run_id"],
                                                                                 run["run_id"])
