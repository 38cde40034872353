"""The seed guide's commands, run as documented in real subprocesses: `python3 training.py`,
`python3 scripts/load_checkpoint.py` (MODE=inference|resume) and `python3 training_resume.py`."""
import subprocess
import sys

import mlflow
import pytest
import torch
from conftest import REPO, cli_env
from test_cli import assert_user_error

pytestmark = pytest.mark.slow


def script(name, cwd, **env):
    return subprocess.run([sys.executable, str(REPO / name)], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=300)


def steps_in(directory):
    return sorted(int(p.name.split("_step")[1][:4]) for p in directory.glob("checkpoint_*.pt"))


def test_seed_workflow_train_generate_resume(project, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    api = {"PREFECT_API_URL": PREFECT_API_URL.value()}  # the harness's server, for the subprocesses
    (project / "params.yaml").write_text((project
                                          / "params.yaml").read_text().replace("enabled: true",
                                                                               "enabled: false"))
    r = script("training.py", project, ENABLE_CHECKPOINTS="true", CHECKPOINT_INTERVAL="5",
               TRAINING_STEPS="15",
               MODEL_TYPE="gpt", **api)
    assert r.returncode == 0, r.stderr[-3000:]
    assert steps_in(project / "checkpoints") == [5, 10, 15]
    r = script("training.py", project, CHECKPOINT_DIR="default_off", TRAINING_STEPS="10", **api)
    assert r.returncode == 0 and "periodic checkpoints are off" in r.stderr
    assert steps_in(project / "default_off") == [10]  # the guide's default: no periodic checkpoints

    pattern = "checkpoints/checkpoint_gpt_corpus_step0015_*.pt"  # a glob, as in the guide
    r = script("scripts/load_checkpoint.py", project, CHECKPOINT_PATH=pattern, MODE="inference",
               PROMPT="Dear Agnes,", MAX_NEW_TOKENS="25", DEVICE="cpu")
    assert r.returncode == 0 and r.stdout.startswith("Dear Agnes,")
    assert len(r.stdout.rstrip("\n")) >= 25
    # the guide's root form
    r = script("load_checkpoint.py", project, CHECKPOINT_PATH=pattern, MODE="inference")
    assert r.returncode == 0 and r.stdout.strip()

    # guide: "inspect"
    r = script("scripts/load_checkpoint.py", project, CHECKPOINT_PATH=pattern, MODE="resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "from step 15 to step 5015" in r.stdout
    assert f"python3 {REPO}/scripts/load_checkpoint.py" in r.stdout
    assert steps_in(project / "checkpoints") == [5, 10, 15]  # nothing trained
    r = script("scripts/load_checkpoint.py", project, CHECKPOINT_PATH=pattern, MODE="resume",
               RESUME_TRAINING_STEPS="10", RESUME_LEARNING_RATE="0.002")
    assert r.returncode == 0, r.stderr[-3000:]
    # shown before resuming
    assert "model gpt (n_layer=1, n_head=2, n_embd=16), step 15" in r.stderr
    assert steps_in(project / "checkpoints")[-1] == 25
    resumed = torch.load(next((project / "checkpoints").glob("*step0025_*.pt")), weights_only=True)
    first = torch.load(next((project / "checkpoints").glob("*step0015_*.pt")), weights_only=True)
    assert resumed["run_id"] == first["run_id"]  # the same MLflow run continues
    assert resumed["train_state"]["schedule"]["peak"] == pytest.approx(0.002)
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    val = mlflow.MlflowClient().get_metric_history(first["run_id"], "val_loss_est")
    assert max(m.step for m in val) == 25

    (project / "new_letters.md").write_text("Dear Agnes, my kettle sings. " * 40
                                            + "\n\nDear Agnes, the hedge. " * 40)
    r = script("training_resume.py", project, CHECKPOINT_PATH="checkpoints/*step0025_*.pt",
               TRAINING_DATA_SOURCE="new_letters.md", RESUME_TRAINING_STEPS="5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert steps_in(project / "checkpoints")[-1] == 30
    assert "new_letters" in (project / "data" / "prepared" / "meta.json").read_text()


def test_seed_troubleshooting_messages(project):
    r = script("scripts/load_checkpoint.py", project,
               CHECKPOINT_PATH="checkpoints/checkpoint_bigram_x_step5000_1.pt",
               MODE="inference")
    assert_user_error(r, "Checkpoint not found: checkpoints/checkpoint_bigram_x_step5000_1.pt",
                      "ENABLE_CHECKPOINTS=true", "lmpipe ckpt list")
    torch.save({"weights": torch.zeros(2)}, project / "other.pt")
    r = script("scripts/load_checkpoint.py", project, CHECKPOINT_PATH="other.pt", MODE="inference")
    assert_user_error(r, "Checkpoint does not contain model_state_dict", "earlier step")
    r = script("scripts/load_checkpoint.py", project, CHECKPOINT_PATH="other.pt", MODE="train")
    assert_user_error(r, "MODE must be inference or resume, got 'train'")
    r = script("scripts/load_checkpoint.py", project, MODE="inference")
    assert_user_error(r, "CHECKPOINT_PATH is not set")
    r = script("scripts/load_checkpoint.py", project, CHECKPOINT_PATH="x.pt", MAX_NEW_TOKENS="lots")
    assert_user_error(r, "MAX_NEW_TOKENS must be a positive integer, got 'lots'")


def test_seed_workflow_ls_sort_tail_resumes_the_newest(project):
    """The guide's `CHECKPOINT=$(ls checkpoints/ | sort | tail -1)` then `CHECKPOINT_PATH=
    checkpoints/$CHECKPOINT MODE=resume python3 scripts/load_checkpoint.py`: the manifest is hidden
    from ls, so the newest checkpoint is what resumes."""
    from lmpipe import stages
    from lmpipe.config import load_config

    cfg = load_config("params.yaml", env={})
    stages.prepare(cfg)
    stages.build_tokenizer(cfg)
    stages.train(cfg)  # in this process: the guide's command below is the one under test
    assert steps_in(project / "checkpoints") == [10, 20]
    guide = ("CHECKPOINT=$(ls checkpoints/ | sort | tail -1); "
             "CHECKPOINT_PATH=checkpoints/$CHECKPOINT MODE=resume "
             f"python3 {REPO / 'scripts' / 'load_checkpoint.py'}")
    r = subprocess.run(["bash", "-c", guide], env=cli_env(RESUME_TRAINING_STEPS="5"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint checkpoints/checkpoint_gpt_corpus_step0020_" in r.stderr  # described first
    assert steps_in(project / "checkpoints") == [10, 20, 25]
