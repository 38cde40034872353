"""The tracking server goes away: training goes on, MLflow writes wait in the tracking buffer on
disk, and reach the server once it is back, each exactly once. A real `mlflow server` (SQLite in a
temporary directory, proxied artifacts, 127.0.0.1 on a free port) is killed, hung and restarted
around a tiny training run."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import BIN, REPO, cli_env

from lmpipe.config import load_config
from lmpipe.tracking import buffer

RUN_STEPS = 40  # checkpoints at 10, 20, 30, 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1:port over one SQLite file and artifact folder, as its own
    process group: killed, hung (SIGSTOP) and started again on the same port by the test."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 180) -> None:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the server's, closed by it
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.root}/mlflow.db", "--artifacts-destination",
             str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=cli_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        log.close()
        deadline = time.monotonic() + timeout
        while buffer.unanswered(self.uri):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("mlflow server did not start:\n"
                                     + (self.root / "server.log").read_text()[-3000:])
            time.sleep(0.2)

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """The whole group at once: the CLI and its uvicorn worker."""
        if self.proc is not None:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


@pytest.fixture
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def fresh_buffer_state(monkeypatch):
    """No server is known to be down at the start of a test."""
    monkeypatch.setattr(buffer, "_down", {})


def lmpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmpipe", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120,
                          env=cli_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))


# --- without a server ----------------------------------------------------------------------------

def test_flush_with_nothing_buffered_says_so_and_succeeds(tmp_path):
    r = lmpipe("tracking", "flush", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("nothing to send: .lmpipe/tracking-buffer holds no buffered "
                                "MLflow writes")


def test_a_stopped_server_costs_training_no_wait_and_flush_keeps_the_writes(project, monkeypatch):
    """Nothing listens on the port: each write tries, is refused at once and goes to the journal;
    `lmpipe tracking flush` says so in one line, exits 1 and keeps the writes."""
    import mlflow  # noqa: F401 - imported before the clock starts, as in a training run

    from lmpipe.tracking.runs import MetricLog

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    log = MetricLog("0123abcd")
    started = time.monotonic()
    for step in (5, 10):
        log.log(step, {"train_loss": 1.0 / step})
        log.flush()
    assert time.monotonic() - started < 1
    kept = buffer.pending("0123abcd")
    assert len(kept) == 2 and all("-metrics-" in p.name for p in kept)

    r = lmpipe("tracking", "flush", cwd=project)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and uri in r.stderr and "2 buffered writes stay" in r.stderr
    assert buffer.pending("0123abcd") == kept


def test_a_hung_server_costs_one_timeout_then_is_left_alone(project, monkeypatch):
    """A server that takes connections and never answers (a socket nobody accepts from): the
    first write waits TIMEOUT_S, the next ones within RETRY_EVERY_S do not try."""
    import mlflow  # noqa: F401

    from lmpipe.tracking.runs import MetricLog

    monkeypatch.setitem(buffer._QUICK, "MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(buffer, "TIMEOUT_S", 2)
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{hung.getsockname()[1]}")
        log = MetricLog("4567cdef")
        took = []
        for step in (5, 10, 15):
            log.log(step, {"train_loss": 1.0 / step})
            started = time.monotonic()
            log.flush()
            took.append(time.monotonic() - started)
    assert 1.9 < took[0] < 5 and max(took[1:]) < 1, took  # (a journal write: milliseconds)
    assert len(buffer.pending("4567cdef")) == 3


# --- a real server, stopped and started again during a run ---------------------------------------

@pytest.mark.slow
def test_training_outlasts_a_tracking_server_outage(project, mlflow_server, monkeypatch):
    """Server up, then hung (SIGSTOP) from checkpoint 10 to 20, then killed at checkpoint 30 and
    started again (same port) only after training, evaluate and generate have finished; the
    buffer sends everything, each metric step and checkpoint model exactly once."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    from lmpipe import stages
    from lmpipe.tracking import runs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setattr(buffer, "TIMEOUT_S", 2)  # a hung server costs 2 s per try, not 5
    monkeypatch.setitem(buffer._QUICK, "MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(buffer, "RETRY_EVERY_S", 0)  # the server is back at the next checkpoint
    cfg = load_config("params.yaml", [f"train.steps={RUN_STEPS}", "tracking.register=true"])
    stages.prepare(cfg)
    stages.build_tokenizer(cfg)

    seen = {}
    logged = runs.TrainingTracker.checkpoint_saved

    def outage(tracker, path, entry):  # the checkpoint writer's hook, after each logged model
        logged(tracker, path, entry)
        step = entry["step"]
        if step == 10:
            mlflow_server.signal(signal.SIGSTOP)  # hung: takes connections, never answers
        elif step == 20:
            seen["hung"] = [p.name.split("-")[1] for p in buffer.pending()]
            mlflow_server.signal(signal.SIGCONT)
        elif step == 30:
            seen["after"] = [p.name.split("-")[1] for p in buffer.pending(kinds=("checkpoint",))]
            mlflow_server.kill()

    monkeypatch.setattr(runs.TrainingTracker, "checkpoint_saved", outage)
    started = time.monotonic()
    info = stages.train(cfg, entry="test")
    trained_s = time.monotonic() - started
    run_id = info["run_id"]
    assert info["step"] == RUN_STEPS
    assert "checkpoint" in seen["hung"] and seen["after"] == []  # 20 waited, went with 30

    # Training ended with the server down; evaluate and generate buffer their results too, while
    # registration needs the server and says so in one line.
    stages.evaluate(cfg, info)
    stages.generate(cfg, info)
    with pytest.raises(buffer.TrackingUnreachable, match="does not answer"):
        stages.register(cfg, info)
    left = buffer.pending(run_id)
    assert {p.name.split("-")[1] for p in left} == {"metrics", "checkpoint", "artifacts", "end"}

    r = lmpipe("tracking", "flush", cwd=project)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and mlflow_server.uri in r.stderr
    assert buffer.pending(run_id) == left

    mlflow_server.start()  # the same port, the same store
    said = buffer.flush_all(runs.senders())  # what `lmpipe tracking flush` prints
    assert said.startswith(f"sent {len(left)} buffered MLflow writes"), said
    assert buffer.pending() == [] and buffer.refused() == []
    assert lmpipe("tracking", "flush", cwd=project).stdout.startswith("nothing to send")

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    train_log = pd.read_csv(project / "outputs" / "train_log.csv")
    # the training log's val_loss is MLflow's val_loss_est (the training-time estimate)
    for key, column in (("train_loss", "train_loss"), ("lr", "lr"), ("val_loss_est", "val_loss")):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == train_log.dropna(subset=[column])["step"].tolist(), key
    for key in ("eval_val_loss", "eval_bits_per_byte"):  # the evaluation of every checkpoint, once
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == [10, 20, 30, 40], (key, steps)

    ckpts = sorted((project / "checkpoints").glob("*.pt"))
    assert [c.name for c in ckpts] == sorted(Path(p).name for p in info["checkpoints"])
    assert len(ckpts) == RUN_STEPS // 10
    models = client.search_logged_models(experiment_ids=[info["experiment_id"]],
                                         filter_string=f"source_run_id = '{run_id}'")
    assert sorted(m.name for m in models) == [f"checkpoint-step{s}" for s in (10, 20, 30, 40)]
    assert all(m.status == LoggedModelStatus.READY for m in models)
    assert all("val_loss_est" in {m.key for m in model.metrics} for model in models)
    names = {a.path for d in ("training", "samples", None)
             for a in client.list_artifacts(run_id, d)}
    assert {"training/train_log.csv", "loss.png", "samples/step40.txt"} <= names
    assert trained_s < 60, trained_s
