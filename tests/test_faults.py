"""Fault tests on real training subprocesses: SIGKILL at random moments, SIGINT/SIGTERM emergency
saves, a second SIGINT, a file-size limit (RLIMIT_FSIZE) and a small filesystem."""
import resource
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from conftest import BIN, cli_env

from lmpipe import stages
from lmpipe.ckpt.integrity import verify_checkpoint
from lmpipe.ckpt.locate import latest_verified
from lmpipe.ckpt.manifest import read_manifest
from lmpipe.ckpt.store import list_checkpoints, load_checkpoint, parse_filename
from lmpipe.config import load_config
from lmpipe.train.schedule import Schedule

pytestmark = pytest.mark.slow

FAULT = ["train.steps=300", "checkpoint.interval=50", "train.eval_interval=50",
         "train.log_interval=1",
         "train.batch_size=8", "model.n_embd=32", "model.dropout=0.1",
         "tracking.log_checkpoints=false",
         "generate.max_new_tokens=5"]


@pytest.fixture
def fault_project(project):
    """The tiny project, prepared and tokenized, with settings for fault runs in params.yaml."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for item in FAULT:
        key, value = item.split("=")
        section, name = key.split(".")
        params[section][name] = yaml.safe_load(value)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cfg = load_config("params.yaml", env={})
    stages.prepare(cfg)
    stages.build_tokenizer(cfg)
    return project


def start(project, *args, preexec=None):
    return subprocess.Popen([str(BIN / "lmpipe"), *args], cwd=project, env=cli_env(),
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec)


def run(project, *args, preexec=None, ok=True):
    p = start(project, *args, preexec=preexec)
    out, err = p.communicate(timeout=300)
    if ok:
        assert p.returncode == 0, err[-3000:]
    return p.returncode, out, err


def cli(capsys, *args, ok=True) -> tuple[int, str, str]:
    """`lmpipe ARGS` in this process (in the project directory), as run() returns it: for the steps
    that signal, limit or kill nothing, without a subprocess's ~5 s of imports."""
    from lmpipe.cli.main import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    if ok:
        assert code == 0, err[-3000:]
    return code, out, err


def wait_for_step(directory: Path, step: int, proc, timeout=120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(e["step"] >= step for e in read_manifest(directory).values()):
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.005)
    raise AssertionError(f"no checkpoint at step {step} within {timeout}s")


def final_checkpoint(directory: Path, step: int) -> dict:
    found = [p for p in list_checkpoints(directory) if parse_filename(p)["step"] == step]
    assert found, f"no step-{step} checkpoint in {directory}"
    return load_checkpoint(found[-1])


def assert_same_training(a: dict, b: dict) -> None:
    for k, v in a["model_state_dict"].items():
        assert torch.equal(v, b["model_state_dict"][k]), k
    for i, st in a["optimizer_state_dict"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer_state_dict"]["state"][i][k]), (i, k)


def per_step_losses(project, run_id) -> dict[int, float]:
    """train_loss by step; a step logged twice (before a kill and after the resume) must agree."""
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    out: dict[int, float] = {}
    for m in mlflow.MlflowClient().get_metric_history(run_id, "train_loss"):
        assert out.setdefault(m.step, m.value) == m.value, f"step {m.step} logged with two values"
    return out


def assert_clean(directory: Path) -> None:
    assert not list(directory.glob(".*.tmp")), "a temporary was left behind"
    for p in directory.glob("*.pt"):
        assert verify_checkpoint(p).ok, p


@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_sigkill_then_resume_is_bit_exact(fault_project, capsys, kind):
    # the uninterrupted reference in this process (one torch thread, as its subprocesses have)
    cli(capsys, "stage", "train", "-S", f"model.type={kind}", "-S", "checkpoint.dir=ref")
    ref = final_checkpoint(fault_project / "ref", 300)

    p = start(fault_project, "stage", "train", "-S", f"model.type={kind}", "-S",
              "checkpoint.dir=run")
    wait_for_step(fault_project / "run", 100, p)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    assert parse_filename(latest_verified(fault_project / "run"))["step"] < 300
    run(fault_project, "resume", "--checkpoint", "latest", "-S", "checkpoint.dir=run")
    resumed = final_checkpoint(fault_project / "run", 300)

    assert_same_training(ref, resumed)
    assert resumed["run_id"] != ref["run_id"]
    ref_losses = per_step_losses(fault_project, ref["run_id"])
    assert per_step_losses(fault_project, resumed["run_id"]) == ref_losses  # same run, steps 1..300
    assert sorted(ref_losses) == list(range(1, 301))


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_a_verified_checkpoint_and_says_how_to_resume(fault_project, capsys, sig,
                                                                   code):
    p = start(fault_project, "stage", "train", "-S", "train.steps=100000")
    wait_for_step(fault_project / "checkpoints", 50, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err[-2000:]
    line = next(ln for ln in err.splitlines() if "training stopped by" in ln)
    step = int(line.split(" at step ")[1].split(";")[0])
    path = Path(line.split("saved and verified ")[1])
    assert "Traceback" not in err and f"lmpipe resume --checkpoint {path}" in err
    assert verify_checkpoint(fault_project / path).ok
    assert load_checkpoint(fault_project / path)["step"] == step
    row = next(ln for ln in cli(capsys, "ckpt", "list")[1].splitlines() if path.name in ln)
    assert f"— (last eval at step {(step - 1) // 50 * 50})" in row  # saved without evaluating
    assert_clean(fault_project / "checkpoints")
    cli(capsys, "resume", "--checkpoint", str(path), "--steps", "5")
    assert parse_filename(latest_verified(fault_project / "checkpoints"))["step"] == step + 5


def test_second_sigint_abandons_the_save_without_a_partial_file(fault_project):
    p = start(fault_project, "stage", "train", "-S", "train.steps=100000", "-S", "model.n_embd=128")
    wait_for_step(fault_project / "checkpoints", 50, p)
    p.send_signal(signal.SIGINT)
    time.sleep(0.002)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert_clean(fault_project / "checkpoints")
    assert latest_verified(fault_project / "checkpoints")


def test_file_size_limit_fails_writes_cleanly(fault_project, capsys):
    cli(capsys, "stage", "train", "-S", "model.n_embd=128", "-S", "train.steps=100")
    before = {p.name: p.read_bytes() for p in (fault_project / "checkpoints").glob("*.pt")}
    size = min(len(b) for b in before.values())
    limit = size // 2  # checkpoints cannot be written; the manifest, logs and MLflow's database can

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code, _, err = run(fault_project, "resume", "--checkpoint", "latest", "--steps", "100",
                       preexec=cap, ok=False)
    assert code == 2 and "File too large" in err and "earlier checkpoints are intact" in err
    assert "final checkpoint could not be written" in err and "Traceback" not in err
    after = {p.name: p.read_bytes() for p in (fault_project / "checkpoints").glob("*.pt")}
    assert after == before
    assert_clean(fault_project / "checkpoints")


def test_small_disk_skips_saves_and_keeps_training(fault_project, capsys):
    cli(capsys, "stage", "train", "-S", "model.n_embd=128", "-S", "train.steps=1",
        "-S", "checkpoint.dir=probe")
    size = next((fault_project / "probe").glob("*.pt")).stat().st_size
    # room for two checkpoints plus the margin, not three
    mb = (size * 2 + (3 << 20)) // (1 << 20) + 1
    script = (f"mount -t tmpfs -o size={mb}m tmpfs checkpoints && {BIN / 'lmpipe'} stage train -S "
              "model.n_embd=128 -S train.steps=200; echo rc=$?; ls -a checkpoints; "
              f"{BIN / 'python'} -c \"from lmpipe.ckpt import integrity as i, store as s; "
              "print('verified', sorted(i.verify_checkpoint(p).status for p in "
              "s.list_checkpoints('checkpoints')))\"")
    (fault_project / "checkpoints").mkdir()
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=fault_project, env=cli_env(),
                       capture_output=True, text=True, timeout=300)
    if "mount" in r.stderr and "rc=" not in r.stdout:
        pytest.skip(f"cannot mount a small filesystem here: {r.stderr.strip()[:200]}")
    assert "rc=2" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "not enough disk space" in r.stderr and "training on" in r.stderr
    assert "verified ['ok', 'ok']" in r.stdout  # the two that fit, intact
    assert ".tmp" not in r.stdout


def test_resume_options_end_to_end(fault_project, capsys):
    cli(capsys, "stage", "train", "-S", "train.steps=40", "-S", "checkpoint.interval=20")
    ckdir = fault_project / "checkpoints"
    new = "".join(f"## Letter {i}\n\nDear Agnes, \u00a7 and \u00b6 are new here, letter {i}. Many "
                  "words today.\n\n"
                  for i in range(12))
    (fault_project / "new.md").write_text(new)
    before = (fault_project / "data/prepared/train.txt").read_text()
    code, _, err = cli(capsys, "resume", "--checkpoint", "latest", "--steps", "5",
                       "--source", "new.md", ok=False)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("lmpipe: error: new.md: ")
    assert "unknown to the char tokenizer: 'L', '\u00a7', '\u00b6'" in err
    assert (fault_project / "data/prepared/train.txt").read_text() == before  # nothing was written

    # A fresh optimizer with a re-warmup: the first resumed step runs at 1/K of the checkpoint's LR.
    ckpt = load_checkpoint(latest_verified(ckdir))
    lr40 = Schedule.from_dict(ckpt["train_state"]["schedule"]).lr_at(40)
    cli(capsys, "resume", "--checkpoint", "latest", "--steps", "10", "--no-optimizer",
        "--warmup", "5")
    mlflow.set_tracking_uri(f"sqlite:///{fault_project}/mlruns/mlflow.db")
    lrs = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(ckpt["run_id"], "lr")}
    assert lrs[41] == pytest.approx(lr40 / 5) and lrs[45] == pytest.approx(lr40)
    assert parse_filename(latest_verified(ckdir))["step"] == 50

    # --lr restarts the decay from that peak.
    cli(capsys, "resume", "--checkpoint", "latest", "--steps", "10", "--lr", "0.005")
    lrs = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(ckpt["run_id"], "lr")}
    assert lrs[51] == pytest.approx(0.005)
    code, _, err = cli(capsys, "resume", "--checkpoint", "latest", ok=False)
    assert code == 2 and "already at step 60" in err and "--steps N" in err
