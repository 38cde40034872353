"""Training in two processes with torchrun and DistributedDataParallel (gloo, on this machine's two
CPU cores), both launched by lmpipe (train.nproc / NPROC) and by the user's own torchrun: the loss
goes down, rank 0 alone tracks and writes checkpoints in the single-process format, resume at the
same world size is bit-exact, at another one it works and says so, SIGTERM saves once, and a killed
rank fails the job fast."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from prefect import flow

from lmpipe import stages
from lmpipe.ckpt.integrity import verify_checkpoint
from lmpipe.ckpt.manifest import read_manifest
from lmpipe.config import load_config
from lmpipe.train.distributed import rank_seed
from tasks.train import train_model
from tests.conftest import cli_env, lay_out_tiny_project

pytestmark = pytest.mark.slow

STEPS, INTERVAL = 400, 100
SETTINGS = [f"train.steps={STEPS}", f"checkpoint.interval={INTERVAL}", "train.log_interval=20",
            "train.eval_interval=100", "tracking.log_checkpoints=false"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "lmpipe", "stage", "train"]
# a killed rank: the others fail at their next collective and torchrun stops them (SIGTERM, then
# SIGKILL after its 30 s shutdown timeout), so the job ends well inside this bound
FAIL_FAST_S = 60


def _overrides(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("-S", s)]


def _lmpipe(root: Path, *args: str, env: dict | None = None, check=True):
    r = subprocess.run([sys.executable, "-m", "lmpipe", *args], cwd=root, env=env or _env(root),
                       capture_output=True, text=True, timeout=300)
    assert not check or r.returncode == 0, r.stdout + r.stderr
    return r


def _env(root: Path, **extra: str) -> dict[str, str]:
    return cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlruns/mlflow.db", OMP_NUM_THREADS="1",
                   **extra)


@contextlib.contextmanager
def _inside(root: Path, **env: str):
    """`root` as the working directory and `env` set, for code run in this process."""
    here, before = os.getcwd(), {k: os.environ.get(k) for k in env}
    os.chdir(root)
    os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(here)
        for k, v in before.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, prefect_harness):
    """A tiny project with prepared data and tokenizer, trained once with train.nproc=2 by the
    pipeline's Prefect training task (which launches torchrun): its train.json, with the run's
    checkpoints by step."""
    root = tmp_path_factory.mktemp("ddp")
    lay_out_tiny_project(root)
    (root / "mlruns").mkdir()

    @flow
    def train_in_two_processes(config: dict) -> dict:
        return train_model(config)

    with _inside(root, MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlruns/mlflow.db",
                 OMP_NUM_THREADS="1"):
        cfg = load_config("params.yaml", [*SETTINGS, "train.nproc=2"], env={})
        stages.prepare(cfg)
        stages.build_tokenizer(cfg)
        info = train_in_two_processes(cfg.to_dict())
    assert json.loads((root / "outputs" / "train.json").read_text()) == info
    # its checkpoints by step, before other tests continue its run
    return root, {**info, "by_step": _by_step(root, info["run_id"])}


def _by_step(root: Path, run_id: str) -> dict[int, Path]:
    directory = root / "checkpoints"
    return {e["step"]: directory / name for name, e in read_manifest(directory).items()
            if e.get("run_id") == run_id and (directory / name).exists()}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _tensors(obj, prefix=""):
    """Every tensor in a nested dict/list, by its path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def _assert_same_training(a: dict, b: dict) -> None:
    """Weights and optimizer state equal bit for bit."""
    for key in ("model_state_dict", "optimizer_state_dict"):
        ta, tb = dict(_tensors(a[key])), dict(_tensors(b[key]))
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), key


def test_each_rank_draws_its_own_batches():
    seeds = {rank_seed(7, rank) for rank in range(4)}
    assert rank_seed(7, 0) == 7 and len(seeds) == 4  # rank 0 draws what a single process draws
    assert rank_seed(7, 1, step=100) not in seeds  # re-derived at a resume's step


def test_the_prefect_task_trains_in_two_processes_the_loss_goes_down_rank_0_alone_tracks(ddp):
    root, info = ddp
    log = (root / "outputs" / "train_log.csv").read_text().splitlines()
    header = log[0].split(",")
    losses = [float(r.split(",")[header.index("train_loss")]) for r in log[1:]
              if r.split(",")[header.index("train_loss")]]
    assert losses[-1] < losses[0] - 0.5, losses

    run = mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db").get_run(info["run_id"])
    assert run.data.params["world_size"] == "2" and run.data.params["train.nproc"] == "2"
    assert run.data.params["effective_batch_size"] == "8"  # batch_size 4 × 2 processes × 1
    history = mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db").get_metric_history(
        info["run_id"], "train_loss")
    assert sorted(m.step for m in history) == list(range(20, STEPS + 1, 20))  # once each
    assert sorted(info["by_step"]) == [100, 200, 300, 400]  # one writer


def test_resume_at_world_size_1_works_and_keeps_the_checkpoint_format(ddp, capsys):
    root, info = ddp
    two = info["by_step"]
    with _inside(root, MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlruns/mlflow.db"):
        cfg = load_config("params.yaml", SETTINGS, env={})  # train.nproc 1: this process alone
        one = stages.resume(cfg, stages.plan_resume(cfg, str(two[200])))  # `lmpipe resume`
    err = capsys.readouterr().err
    assert "written by 2 training process(es), this run has 1" in err and "not bit-exact" in err
    assert one["step"] == STEPS and one["run_id"] == info["run_id"]
    run = mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db").get_run(one["run_id"])
    assert run.data.params["world_size"] == "2"  # the run's first segment
    assert run.data.tags["lmpipe.resume.step200.world_size"] == "1"  # this one

    a, b = _load(two[STEPS]), _load(root / one["checkpoint"])
    assert verify_checkpoint(two[STEPS]).ok and verify_checkpoint(root / one["checkpoint"]).ok
    assert a.keys() == b.keys()
    assert not any(k.startswith("module.") for k in a["model_state_dict"])
    assert {k: (v.shape, v.dtype) for k, v in a["model_state_dict"].items()} == \
        {k: (v.shape, v.dtype) for k, v in b["model_state_dict"].items()}
    shapes = lambda c: {k: v.shape for k, v in _tensors(c["optimizer_state_dict"])}  # noqa: E731
    assert shapes(a) == shapes(b)
    # the two-process state adds every rank's RNGs to the single-process one
    assert set(a["train_state"]) - set(b["train_state"]) == {"world_size", "rank_rngs"}
    assert a["train_state"]["world_size"] == 2 and len(a["train_state"]["rank_rngs"]) == 2
    r0, r1 = a["train_state"]["rank_rngs"]
    assert torch.equal(r0["sampler_rng"], a["train_state"]["sampler_rng"])
    assert not torch.equal(r0["sampler_rng"], r1["sampler_rng"])


def _ranks(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """torchrun's worker processes (in their own sessions) by RANK."""
    out = {}
    for p in launcher.children(recursive=True):
        try:
            rank = p.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and "lmpipe" in " ".join(p.cmdline()):
            out[int(rank)] = p
    return out


def _wait_for(condition, what: str, timeout: float = 120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _stop(procs) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def test_a_killed_rank_fails_the_job_fast_and_resume_at_world_size_2_is_bit_exact(ddp, tmp_path):
    root, info = ddp
    out = open(tmp_path / "torchrun.log", "w+")
    job = subprocess.Popen([*TORCHRUN, *_overrides(SETTINGS)], cwd=root, env=_env(root),
                           stdout=out, stderr=subprocess.STDOUT)
    launcher, ranks = psutil.Process(job.pid), {}
    try:
        ranks = _wait_for(lambda: len(_ranks(launcher)) == 2 and _ranks(launcher), "2 ranks")
        run_id = _wait_for(lambda: next(
            (e["run_id"] for e in read_manifest(root / "checkpoints").values()
             if e["run_id"] != info["run_id"] and e["run_id"] is not None), None),
            "the first checkpoint")
        ranks[1].kill()  # SIGKILL
        killed = time.monotonic()
        code = job.wait(timeout=FAIL_FAST_S)
        assert code != 0 and time.monotonic() - killed < FAIL_FAST_S
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                       for p in ranks.values())
    finally:
        _stop([*ranks.values(), launcher])
        job.wait()
    out.seek(0)
    assert "exitcode  : -9" in out.read()  # torchrun names the killed rank
    assert mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db").get_run(
        run_id).info.status == "FAILED"

    saved = _by_step(root, run_id)
    newest = saved[max(saved)]
    assert max(saved) < STEPS and verify_checkpoint(newest).ok
    r = subprocess.run([*TORCHRUN, *_overrides([*SETTINGS, f"train.resume={newest}"])], cwd=root,
                       env=_env(root), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = _by_step(root, run_id)[STEPS]
    _assert_same_training(_load(resumed), _load(info["by_step"][STEPS]))


def test_sigterm_to_the_launcher_saves_once_and_every_rank_exits(ddp, tmp_path):
    root, _ = ddp
    log = tmp_path / "launcher.log"
    with open(log, "w") as out:
        job = subprocess.Popen([sys.executable, "-m", "lmpipe", "stage", "train",
                                *_overrides([*SETTINGS, "train.steps=100000"])], cwd=root,
                               env=_env(root, NPROC="2"), stdout=out, stderr=subprocess.STDOUT)
    launcher, ranks, tree = psutil.Process(job.pid), {}, []
    try:
        ranks = _wait_for(lambda: len(_ranks(launcher)) == 2 and _ranks(launcher), "2 ranks")
        tree = launcher.children(recursive=True)  # torchrun and the ranks
        _wait_for(lambda: "step 120/" in log.read_text(), "training past a checkpoint")
        job.send_signal(signal.SIGTERM)
        code = job.wait(timeout=FAIL_FAST_S)
        for p in ranks.values():
            p.wait(timeout=FAIL_FAST_S)
    finally:
        _stop([*tree, launcher])
        job.wait()
    text = log.read_text()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert text.count("training stopped by SIGTERM") == 1 and "saved and verified" in text
    after = text[text.index("received SIGTERM"):]
    assert after.count("saved checkpoint") == 1  # rank 0 once; rank 1 writes nothing
    assert text.count("received SIGTERM") == 1  # rank 1 stops quietly
    assert text.count("step 100/") == 1  # only rank 0 prints progress
    emergency = Path(root / after.split("saved checkpoint ")[1].split()[0])
    assert verify_checkpoint(emergency).ok
    assert len(_load(emergency)["train_state"]["rank_rngs"]) == 2
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks.values())


def test_more_processes_than_the_machine_has_is_refused(ddp):
    root, _ = ddp
    before = sorted(p.name for p in (root / "outputs").iterdir())
    r = _lmpipe(root, "stage", "train", env=_env(root, NPROC=str(len(os.sched_getaffinity(0)) + 1)),
                check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = [x for x in r.stderr.splitlines() if "error:" in x]
    assert len(line) == 1 and f"train.nproc={len(os.sched_getaffinity(0)) + 1}" in line[0]
    assert "CPU cores" in line[0] and "at most" in line[0]
    assert sorted(p.name for p in (root / "outputs").iterdir()) == before
