"""Training in a child process, one attempt at a time (the Prefect training task and its retries).

Each attempt runs `python -m lmpipe stage train --attempt DIR`: a crash or kill of training fails
that attempt only, and the task's retry runs the next; concurrent trainings share no file; a
launcher such as torchrun can start the same command. A retry continues the run that an earlier
attempt started: the same MLflow run, from that run's newest verified checkpoint (never another
run's, though runs may share checkpoint.dir), or from the start when it saved none.

DIR, one per task run, holds what an attempt is given and what it reports:
  request.json  {"config": Config.to_dict(), "entry": ...}: the configuration, already resolved
  run.json      {"run_id": ...}: written by the child as soon as its MLflow run starts
  train.json    the train stage's result, with the training log and loss plot beside it
  error.json    {"message", "exit_code", "prefix"}: a UserError (bad input, a stop on a signal)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from lmpipe.ckpt.locate import latest_of_run
from lmpipe.common.errors import UserError
from lmpipe.common.fileio import atomic_write_text
from lmpipe.common.paths import LOSS_PLOT, OUTPUTS, TRAIN_INFO, TRAIN_LOG
from lmpipe.tracking import runs
from lmpipe.train import distributed
from lmpipe.train.resume import Resume

ATTEMPTS = OUTPUTS / "attempts"  # one directory per task run; removed when its training succeeds
REQUEST, RUN, ERROR = "request.json", "run.json", "error.json"
STOPS = (signal.SIGINT, signal.SIGTERM)  # a person or a cancellation asked training to stop
_STORE = threading.Lock()


class TrainingCrashed(RuntimeError):
    """The training process died (killed, or an unexpected error): a retry may get further."""

    def __init__(self, how: str):
        super().__init__(f"the training process {how} (its output is above); a retry resumes its "
                         "MLflow run from the run's newest verified checkpoint")
        self.how = how


def crashed_without_retry(e: TrainingCrashed, directory: Path, checkpoint_dir: str) -> UserError:
    """A crash where no retry follows (`lmpipe stage train` with train.nproc > 1): one line with
    the checkpoint its run can be resumed from (exit 1)."""
    run_id = recorded_run_id(directory)
    path = latest_of_run(checkpoint_dir, run_id) if run_id else None
    then = (f"resume with: lmpipe resume --checkpoint {path}" if path else
            "it saved no verified checkpoint; train again")
    error = UserError(f"the training process {e.how} (its output is above); {then}")
    error.exit_code = 1
    return error


class TrainingFailed(UserError):
    """The training process ended on a UserError (bad input, a stop on a signal), which a retry
    would meet again: its message and exit code."""

    def __init__(self, message: str, exit_code: int, prefix: str = UserError.prefix):
        super().__init__(message)
        self.exit_code, self.prefix = exit_code, prefix


# --- the parent: one attempt ---------------------------------------------------------------------

def train(config: dict, directory: Path, entry: str = "prefect",
          resume: Resume | None = None) -> dict:
    """Train `config` (Config.to_dict()) in a child process, or in train.nproc processes under
    torchrun, and return the train stage's result; its train.json, log and plot then replace
    outputs/'s, and `directory` goes. resume: what `lmpipe resume` asks of the checkpoint.
    Raises TrainingCrashed (worth a retry, with the same `directory`) or TrainingFailed."""
    nproc = config["train"].get("nproc", 1)
    if nproc > 1:
        distributed.check_nproc(nproc, config["train"]["device"])
    directory.mkdir(parents=True, exist_ok=True)
    for name in (TRAIN_INFO.name, ERROR):
        (directory / name).unlink(missing_ok=True)
    given = attempt_config(config, directory)
    # a retry resumes its own run from the newest checkpoint (train.resume), not `resume`'s
    plan = None if resume is None or given is not config else {
        **dataclasses.asdict(resume), "checkpoint": str(resume.checkpoint)}
    _write(directory / REQUEST, {"config": given, "entry": entry, "resume": plan})
    ready_store(config["tracking"]["experiment"])
    child = subprocess.Popen(command(directory, nproc),
                             env=child_env(nproc, config["train"]["device"]))
    code = wait(child)
    if code != 0:
        error = failure(code, directory)
        if isinstance(error, TrainingCrashed) and recorded_run_id(directory):
            _mark_failed(recorded_run_id(directory))
        raise error
    info = json.loads((directory / TRAIN_INFO.name).read_text())
    publish(directory)
    shutil.rmtree(directory, ignore_errors=True)
    return info


def attempt_config(config: dict, directory: Path) -> dict:
    """`config`, or, after an attempt that started a run and saved a verified checkpoint, that run
    resumed from its newest one (train.resume), which continues the same MLflow run bit-exactly."""
    run_id = recorded_run_id(directory)
    if run_id is None:
        return config
    path = latest_of_run(config["checkpoint"]["dir"], run_id)
    if path is None:
        _say(f"retry: MLflow run {run_id} saved no checkpoint that verifies; training from the "
             "start")
        return config
    _say(f"retry: resuming MLflow run {run_id} from {path}")
    return {**config, "train": {**config["train"], "resume": str(path)}}


def ready_store(experiment: str) -> None:
    """The MLflow store and experiment exist before a child opens them: two processes creating a
    fresh SQLite store at once both fail, and leave its schema half-migrated for good."""
    from lmpipe import tracking

    with _STORE:  # concurrent trainings of one flow run in threads of this process
        tracking.setup(experiment)


def _mark_failed(run_id: str) -> None:
    """The killed attempt's MLflow run as FAILED until a retry continues it; a tracking server
    that is down too must not turn the crash (retried) into another error."""
    try:
        runs.mark_failed(run_id)
    except Exception as e:  # any MLflow or network error
        _say(f"warning: MLflow run {run_id} stays marked as running ({type(e).__name__}: {e})")


def command(directory: Path, nproc: int = 1) -> list[str]:
    """`python -m lmpipe stage train --attempt DIR`; under torchrun when nproc > 1."""
    args = ["stage", "train", "--attempt", str(directory)]
    if distributed.wants_launch(nproc):
        return distributed.torchrun_command(nproc, args)
    return [sys.executable, "-m", "lmpipe", *args]


def child_env(nproc: int = 1, device: str = "auto") -> dict[str, str]:
    """This environment, with this lmpipe's project root first on PYTHONPATH (the child runs the
    same code, wherever the working directory is) and output unbuffered (it shows as it comes);
    under torchrun, each process's share of the CPU threads (distributed.launch_env)."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = distributed.launch_env(nproc, device) if nproc > 1 else os.environ
    return {**env, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def wait(child: subprocess.Popen) -> int:
    """The child's exit code. Interrupted meanwhile (Ctrl-C, which the child gets from the terminal
    too; a Prefect cancellation), ask the child to stop and wait for its emergency save: SIGTERM,
    which the child ignores if a Ctrl-C reached it first (a second SIGINT would abandon the
    save). A SIGTERM to this process goes on to the child at once (forward_sigterm)."""
    with forward_sigterm(child):
        try:
            return child.wait()
        except BaseException:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
            child.wait()
            raise


@contextlib.contextmanager
def forward_sigterm(child: subprocess.Popen):
    """While the child runs, a SIGTERM to this process (the launcher: `lmpipe stage train` with
    train.nproc > 1, a Prefect flow run) is sent on to it, so training saves and stops (torchrun
    passes it to every rank) rather than being orphaned; a handler that was in place (Prefect's)
    still runs after. Only the main thread can set handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        if callable(previous):
            previous(signum, frame)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def failure(code: int, directory: Path) -> Exception:
    """Why the child failed: its UserError, a stop on a signal, or a crash (only this retries)."""
    error = _read(directory / ERROR)
    if error:
        return TrainingFailed(error["message"], error["exit_code"], error["prefix"])
    signum = -code if code < 0 else code - 128
    if signum in STOPS:  # killed before its handler was in place, or a KeyboardInterrupt
        return TrainingFailed(f"the training process was stopped by {_signame(signum)}",
                              128 + signum)
    how = f"was killed by {_signame(-code)}" if code < 0 else f"exited with code {code}"
    return TrainingCrashed(how)


def publish(directory: Path) -> None:
    """The attempt's train.json, training log and plot into outputs/, each replaced whole (with
    concurrent trainings, the last to finish is what outputs/ shows)."""
    OUTPUTS.mkdir(exist_ok=True)
    for name in (TRAIN_INFO.name, TRAIN_LOG.name, LOSS_PLOT.name):
        if (directory / name).exists():
            os.replace(directory / name, OUTPUTS / name)


# --- the child: what it reads and reports --------------------------------------------------------

def read_request(directory: Path) -> tuple[dict, str, Resume | None]:
    """The configuration (Config.to_dict()), entry and resume (or None) an attempt is given."""
    request = _read(directory / REQUEST)
    if request is None:
        raise UserError(f"{directory / REQUEST}: not found or not valid JSON; --attempt DIR is "
                        "the Prefect training task's, which writes it")
    plan = request.get("resume")
    resume = None if plan is None else Resume(**{**plan, "checkpoint": Path(plan["checkpoint"])})
    return request["config"], request["entry"], resume


def record_run_id(directory: Path, run_id: str) -> None:
    _write(directory / RUN, {"run_id": run_id})


def recorded_run_id(directory: Path) -> str | None:
    return (_read(directory / RUN) or {}).get("run_id")


def record_error(directory: Path, e: UserError) -> None:
    _write(directory / ERROR, {"message": str(e), "exit_code": e.exit_code, "prefix": e.prefix})


def _write(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _say(line: str) -> None:
    print(f"lmpipe: {line}", file=sys.stderr, flush=True)
