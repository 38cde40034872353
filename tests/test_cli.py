"""The lmpipe command as a user runs it: real subprocesses, exit codes, one-line errors."""
import subprocess
import sys

import pytest
from conftest import BIN, cli_env


def lmpipe(*args, cwd, **env):
    return subprocess.run([str(BIN / "lmpipe"), *args], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=300)


def assert_user_error(r, *needles):
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr and lines, r.stderr
    assert all(ln.startswith("lmpipe: error: ") for ln in lines), r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_help_imports_no_heavy_library():
    code = ("import sys; from lmpipe.cli.main import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch','mlflow','prefect','transformers','pandas') if m in "
            "sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    r = subprocess.run([str(BIN / "lmpipe"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "run" in r.stdout and "generate" in r.stdout


def test_invalid_config_lists_every_problem_before_any_work(project):
    r = lmpipe("run", "-S", "train.steps=-5", "-S", "model.type=gpt3", cwd=project)
    assert_user_error(r, "train.steps must be a positive integer, got -5",
                      "model.type must be one of")
    assert len(r.stderr.strip().splitlines()) == 2
    assert not (project / "data" / "prepared").exists()


def test_invalid_environment_variable_is_named(project):
    r = lmpipe("config", cwd=project, TRAINING_STEPS="lots")
    assert_user_error(r,
                      "train.steps must be an integer, got 'lots' (from environment variable "
                      "TRAINING_STEPS)")


@pytest.mark.parametrize("content,needle", [
    (None, "no such file"), (b"  \n", "empty or whitespace-only"), (b"\x00\x01\x02", "binary"),
    (b"\xff\xfe bad", "not valid UTF-8"), (b"tiny", "corpus too small"),
])
def test_run_with_bad_corpus_fails_fast_with_one_line(project, content, needle):
    f = project / "bad.txt"
    if content is not None:
        f.write_bytes(content)
    r = lmpipe("run", cwd=project, TRAINING_DATA_SOURCE=str(f))
    assert_user_error(r, "bad.txt", needle)
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (project / "data" / "prepared").exists() and not (project / "checkpoints").exists()


def test_stages_then_generate_from_latest(project):
    for stage in ("prepare", "tokenizer", "train"):
        r = lmpipe("stage", stage, "-S", "tracking.log_checkpoints=false", cwd=project)
        assert r.returncode == 0, r.stderr
    ckpts = sorted((project / "checkpoints").glob("checkpoint_gpt_corpus_step*.pt"))
    assert [c.name.split("_step")[1][:4] for c in ckpts] == ["0010", "0020"]
    r = lmpipe("generate", "--prompt", "Dear", "--max-new-tokens", "15", "--seed", "3", cwd=project)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Dear") and len(r.stdout.rstrip("\n")) >= 4 + 1
    again = lmpipe("generate", "--prompt", "Dear", "--max-new-tokens", "15", "--seed", "3",
                   cwd=project)
    assert again.stdout == r.stdout  # seeded
    r = lmpipe("generate", "--prompt", "Dear Agnes, \u00a7", cwd=project)
    assert_user_error(r, "unknown to the char tokenizer: '\u00a7'")
    r = lmpipe("generate", "--checkpoint", "checkpoints/nope.pt", cwd=project)
    assert_user_error(r, "Checkpoint not found: checkpoints/nope.pt")
    import torch

    if not torch.cuda.is_available():
        assert_user_error(lmpipe("generate", "--device", "cuda", cwd=project), "DEVICE=cuda",
                          "DEVICE=cpu")
