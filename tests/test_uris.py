"""Checkpoints by MLflow URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH) in every
command that takes one, on a real tiny run registered twice in a temporary SQLite store."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from conftest import REPO, cli_env, lay_out_tiny_project

from lmpipe.cli.main import main
from lmpipe.config import ENV_VARS, load_config
from lmpipe.tracking.uris import CACHE

NAME = "lmpipe-gpt-corpus"


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    """One trained run (checkpoints at steps 10 and 20), registered twice: version 1 is the final
    checkpoint, version 2 the step-10 one, and the alias champion names version 2."""
    from mlflow import MlflowClient

    from lmpipe import stages
    from lmpipe.tracking import registry

    root = lay_out_tiny_project(tmp_path_factory.mktemp("uris"))
    with pytest.MonkeyPatch.context() as mp:
        for var in ENV_VARS:
            mp.delenv(var, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlruns/mlflow.db")
        (root / "mlruns").mkdir()
        mp.chdir(root)
        cfg = load_config("params.yaml")
        stages.prepare(cfg)
        stages.build_tokenizer(cfg)
        info = stages.train(cfg)
        stages.register(cfg, info, stages.evaluate(cfg, info))
        step10 = Path(info["checkpoints"][0])
        registry.register_model(info["run_id"], step10, NAME, 10, cfg.flat(), cfg.generate)
        MlflowClient().set_registered_model_alias(NAME, "champion", "2")
        MlflowClient().log_artifact(info["run_id"], str(step10), "copies")  # a plain file
        yield {"root": root, "info": info, "step10": step10, "final": Path(info["checkpoint"])}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """`lmpipe ARGV` in this process (the CLI's own error handling included)."""
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def downloads(root: Path, checkpoint_dir: str = "checkpoints") -> list[Path]:
    return sorted((root / checkpoint_dir / CACHE).rglob("*.pt"))


def same_weights(a: Path, b: Path) -> bool:
    x, y = (torch.load(p, weights_only=True) for p in (a, b))
    return all(torch.equal(x["model_state_dict"][k], v) for k, v in y["model_state_dict"].items())


def test_generate_by_version_alias_and_run(reg, capsys):
    args = ("--max-new-tokens", "12", "--seed", "3")
    runs_uri = f"runs:/{reg['info']['run_id']}/checkpoint-step10"
    texts = {}
    for uri, step in ((f"models:/{NAME}/1", 20), (f"models:/{NAME}@champion", 10),
                      (runs_uri, 10), (f"models:/{NAME}/latest", 10)):
        code, out, err = run(capsys, "generate", "--checkpoint", uri, *args)
        assert code == 0, err
        assert f"step {step}," in err and out.startswith("Dear Agnes,")
        texts[uri] = out
    code, out, _ = run(capsys, "generate", "--checkpoint", str(reg["step10"]), *args)
    assert out == texts[f"models:/{NAME}@champion"] == texts[runs_uri]  # the same bytes
    files = downloads(reg["root"])
    assert len(files) == 3 and all(not p.name.startswith(".tmp") for p in files)
    # The files are the registered checkpoints, byte for byte; each version downloaded once.
    assert {p.read_bytes() for p in files} == {reg["step10"].read_bytes(),
                                               reg["final"].read_bytes()}
    # A checkpoint file among a run's artifacts; a cached copy reused, then a damaged one replaced.
    plain = f"runs:/{reg['info']['run_id']}/copies/{reg['step10'].name}"
    code, out, err = run(capsys, "generate", "--checkpoint", plain, *args)
    assert code == 0 and out == texts[runs_uri], err
    v1 = next(p for p in downloads(reg["root"]) if f"/models/{NAME}/1/" in p.as_posix())
    stamp = v1.stat().st_mtime_ns
    run(capsys, "generate", "--checkpoint", f"models:/{NAME}/1", *args)
    assert v1.stat().st_mtime_ns == stamp
    with open(v1, "r+b") as f:
        f.seek(v1.stat().st_size // 2)
        f.write(b"\0" * 64)
    code, out, err = run(capsys, "generate", "--checkpoint", f"models:/{NAME}/1", *args)
    assert code == 0 and "downloading it again" in err and out == texts[f"models:/{NAME}/1"]


def test_resume_from_a_version_continues_its_checkpoint_with_optimizer_and_run(reg, capsys):
    """models:/NAME/2 is the step-10 checkpoint: resumed to the planned 20 steps it ends with the
    uninterrupted run's weights and optimizer state (what a resume of the local file gives,
    test_resume.py), in the same MLflow run; the new checkpoints go to checkpoint.dir."""
    code, out, err = run(capsys, "resume", "--checkpoint", f"models:/{NAME}/2", "-S",
                         "checkpoint.dir=ck-uri")
    assert code == 0, err
    assert f"resumed from models:/{NAME}/2 (ck-uri/{CACHE}/" in out
    assert f"MLflow run {reg['info']['run_id']}" in out
    final = sorted((reg["root"] / "ck-uri").glob("checkpoint_*step0020_*.pt"))
    assert len(final) == 1 and len(downloads(reg["root"], "ck-uri")) == 1
    resumed = torch.load(final[0], weights_only=True)
    straight = torch.load(reg["final"], weights_only=True)
    assert resumed["run_id"] == straight["run_id"] == reg["info"]["run_id"]
    assert all(torch.equal(v, straight["model_state_dict"][k])
               for k, v in resumed["model_state_dict"].items())
    opt_r, opt_s = (c["optimizer_state_dict"]["state"] for c in (resumed, straight))
    assert opt_r.keys() == opt_s.keys() and all(
        torch.equal(opt_r[i][k], opt_s[i][k]) for i in opt_r for k in opt_r[i])


def test_train_resume_param_takes_an_alias(reg):
    from lmpipe import stages

    cfg = load_config("params.yaml", ["train.resume=models:/lmpipe-gpt-corpus@champion",
                                      "checkpoint.dir=ck-param"])
    info = stages.train(cfg)
    assert info["run_id"] == reg["info"]["run_id"] and info["step"] == 20
    assert Path(info["checkpoint"]).parent == Path("ck-param")
    assert same_weights(Path(info["checkpoint"]), reg["final"])


def test_compare_two_uris(reg, capsys):
    code, out, err = run(capsys, "compare", f"models:/{NAME}/1", f"models:/{NAME}@champion",
                         "--max-new-tokens", "8", "--max-batches", "1")
    assert code == 0, err
    assert "step" in out and out.count(reg["final"].name) >= 1 and reg["step10"].name in out
    code, _, err = run(capsys, "compare", f"models:/{NAME}@champion", f"models:/{NAME}/2")
    assert code == 2 and "compare needs different checkpoints" in err


def test_load_checkpoint_script_and_ckpt_verify_take_a_uri(reg, capsys, monkeypatch):
    """scripts/load_checkpoint.py's code (lmpipe.cli.seed), in this process."""
    from lmpipe.cli.seed import main as script

    monkeypatch.setattr(sys, "argv", ["scripts/load_checkpoint.py"])
    monkeypatch.setenv("CHECKPOINT_PATH", f"models:/{NAME}@champion")
    for var, value in (("MODE", "inference"), ("PROMPT", "Dear"), ("MAX_NEW_TOKENS", "10")):
        monkeypatch.setenv(var, value)
    assert script("load_checkpoint") == 0
    out, err = capsys.readouterr()
    assert out.startswith("Dear") and "step 10," in err
    monkeypatch.setenv("MODE", "resume")
    monkeypatch.delenv("PROMPT")
    monkeypatch.delenv("MAX_NEW_TOKENS")
    assert script("load_checkpoint") == 0
    out = capsys.readouterr().out
    assert f"lmpipe resume --checkpoint models:/{NAME}@champion --steps 5000" in out
    assert f"CHECKPOINT_PATH=models:/{NAME}@champion MODE=resume" in out
    code, out, err = run(capsys, "ckpt", "verify", f"models:/{NAME}/1")
    assert code == 0 and out.startswith("ok ") and "1 checked, 0 with problems" in err


@pytest.mark.parametrize("uri, needle", [
    ("models:/nope/1", "no registered model 'nope' in the tracking store sqlite:///"),
    (f"models:/{NAME}/7", f"no version 7 of registered model '{NAME}'; it has versions 1, 2 "
                          "(aliases: challenger → 1, champion → 2)"),
    (f"models:/{NAME}@gold", f"registered model '{NAME}' has no alias 'gold'; it has versions "
                             "1, 2 (aliases: challenger → 1, champion → 2)"),
    (f"models:/{NAME}", f"name a version or an alias of registered model '{NAME}'"),
    ("runs:/0123456789abcdef/model", "no run '0123456789abcdef' in the tracking store"),
    ("s3://bucket/x.pt", "not a checkpoint URI; pass models:/NAME/VERSION"),
])
def test_a_uri_that_does_not_resolve_is_one_line(reg, capsys, uri, needle):
    code, out, err = run(capsys, "generate", "--checkpoint", uri)
    assert code == 2 and not out
    assert err.count("\n") == 1 and err.startswith(f"lmpipe: error: {uri}: ") and needle in err
    if uri == "models:/nope/1":
        assert f"registered models: {NAME}" in err


def test_missing_run_artifact_and_deleted_version_through_the_cli(reg, capsys):
    from mlflow import MlflowClient

    from lmpipe.tracking import registry

    run_id = reg["info"]["run_id"]
    code, _, err = run(capsys, "compare", "latest", f"runs:/{run_id}/nope")
    assert code == 2 and err.count("\n") == 1
    assert f"run {run_id} has no artifact 'nope'; the run's top-level artifacts: " in err
    assert "copies/" in err and "checkpoint-step10/ (logged model)" in err
    code, _, err = run(capsys, "generate", "--checkpoint", f"runs:/{run_id}/loss.png")
    assert code == 2 and "artifact 'loss.png' is not a checkpoint (.pt) file" in err
    # A version whose checkpoint was deleted from the artifact store. Another predict default
    # than training's: the version is a pyfunc model of its own, not the run's checkpoint-step10.
    cfg = load_config("params.yaml", ["generate.temperature=0.5"])
    v3 = registry.register_model(run_id, reg["step10"], NAME, 10, cfg.flat(), cfg.generate)
    client = MlflowClient()
    source = client.get_model_version(NAME, v3["version"]).source  # models:/<model_id>
    model = client.get_logged_model(source.removeprefix("models:/"))
    assert model.name == "model" and model.source_run_id == run_id
    (Path(urlparse(model.artifact_location).path) / "artifacts" / reg["step10"].name).unlink()
    r = subprocess.run([sys.executable, "-m", "lmpipe", "generate", "--checkpoint", v3["uri"]],
                       cwd=reg["root"], env=cli_env(PYTHONPATH=str(REPO)), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert f"{v3['uri']}: the checkpoint of version 3 of registered model '{NAME}'" in r.stderr
    assert "it was deleted" in r.stderr and "it has versions 1, 2, 3" in r.stderr
    assert not [p for p in (reg["root"] / "checkpoints" / CACHE).rglob(".tmp-*")]
