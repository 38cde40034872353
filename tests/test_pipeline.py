"""The whole stack on a tiny config: the Prefect flow (test harness), MLflow (SQLite in a temp dir),
the registered model loaded back through pyfunc, and DVC in a temporary git repo."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from conftest import BIN, REPO, cli_env
from test_report import assert_published

from lmpipe.common.fileio import file_md5
from lmpipe.config import load_config

pytestmark = pytest.mark.slow
NAME_RE = re.compile(r"^checkpoint_gpt_corpus_step(\d{4})_\d{8}_\d{6}\.pt$")


def test_flow_end_to_end(project, prefect_harness):
    from flows.pipeline import run

    cfg = load_config("params.yaml")
    result = run(cfg)
    t = result["train"]

    # Checkpoints in the seed's format, with the seed's keys and the tokenizer inside.
    names = sorted(p.name for p in (project / "checkpoints").glob("*.pt"))
    assert [NAME_RE.match(n).group(1) for n in names] == ["0010", "0020"]
    ckpt = torch.load(t["checkpoint"], weights_only=True)
    assert {"model_state_dict", "optimizer_state_dict", "hyperparameters", "vocab_size",
            "block_size",
            "batch_size", "step", "tokenizer", "format_version"} <= set(ckpt)
    assert ckpt["step"] == 20 and ckpt["hyperparameters"]["train"]["steps"] == 20

    # The MLflow run: params, step metrics, artifacts, lineage tags.
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    run_ = mlflow.get_run(t["run_id"])
    assert run_.data.params["train.lr"] == "0.01" and run_.data.params["model.type"] == "gpt"
    client = mlflow.MlflowClient()
    for key in ("train_loss", "lr", "tokens_per_sec"):
        assert [m.step for m in client.get_metric_history(t["run_id"], key)] == [5, 10, 15, 20]
    assert [m.step for m in client.get_metric_history(t["run_id"], "val_loss_est")] == [10, 20]
    assert {"eval_val_loss", "eval_perplexity", "eval_bits_per_byte"} <= set(run_.data.metrics)
    arts = {a.path for d in ("", "training", "tokenizer", "data",
                             "samples") for a in client.list_artifacts(t["run_id"], d)}
    assert {"loss.png", "training/train_log.csv", "tokenizer/tokenizer.json",
            "data/stats.csv"} <= arts
    assert any(a.startswith("samples/") for a in arts)
    tags = run_.data.tags
    assert tags["dvc.data.train.md5"] == file_md5(project / "data/prepared/train.txt")
    assert tags["dvc.tokenizer.md5"] == file_md5(project / "data/tokenizer/tokenizer.json")
    assert tags["lmpipe.entry"] == "prefect" and "lmpipe.git_commit" in tags

    # Every checkpoint is a logged model at its step, with hyperparameters, rankable by the
    # evaluate stage's eval_val_loss.
    models = mlflow.search_logged_models(experiment_ids=[t["experiment_id"]], output_format="list",
                                         filter_string="name LIKE 'checkpoint-step%'")
    assert sorted(m.name for m in models) == ["checkpoint-step10", "checkpoint-step20"]
    assert all(m.params["train.steps"] == "20" for m in models)
    outputs = {o.model_id: o.step for o in client.get_run(t["run_id"]).outputs.model_outputs}
    assert sorted((outputs[m.model_id], m.name) for m in models) == [(10, "checkpoint-step10"),
                                                                    (20, "checkpoint-step20")]
    assert {m.name: [x.step for x in m.metrics if x.key == "eval_val_loss"] for m
            in models} == {"checkpoint-step10": [10], "checkpoint-step20": [20]}

    # The registered version loads back through pyfunc and generates text with predict params.
    reg = result["registered"]
    assert reg["uri"] == "models:/lmpipe-gpt-corpus/1"
    model = mlflow.pyfunc.load_model(reg["uri"])
    out = model.predict(pd.DataFrame({"prompt": ["Dear Agnes,", "I have"]}),
                        params={"max_new_tokens": 12, "temperature": 0.5})
    assert len(out) == 2 and out[0].startswith("Dear Agnes,")
    assert len(out[0]) == len("Dear Agnes,") + 12

    assert_published(result)  # the run's Prefect artifacts: summary, per-checkpoint table

    metrics = json.loads((project / "outputs/metrics.json").read_text())
    assert metrics["val_loss"] > 0 and metrics["bits_per_byte"] > 0
    assert result["metrics"]["perplexity"] == pytest.approx(metrics["perplexity"])

    # Data preparation and tokenizer building are cached by their inputs ...
    stamp = (project / "data/prepared/train.txt").stat().st_mtime_ns
    tok_stamp = (project / "data/tokenizer/tokenizer.json").stat().st_mtime_ns
    second = run(load_config("params.yaml", ["train.steps=10"]))
    assert (project / "data/prepared/train.txt").stat().st_mtime_ns == stamp
    assert (project / "data/tokenizer/tokenizer.json").stat().st_mtime_ns == tok_stamp
    assert second["registered"]["version"] == "2"
    # ... and rebuilt when the outputs no longer match (deleted here).
    shutil.rmtree(project / "data/prepared")
    run(load_config("params.yaml", ["train.steps=10", "tracking.register=false"]))
    assert (project / "data/prepared/train.txt").exists()


def test_dvc_repro_in_a_fresh_git_repo_then_noop(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("dvc.yaml", "lmpipe", "models", ".dvcignore"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    import yaml
    from conftest import TINY_PARAMS, tiny_corpus

    (repo / "data").mkdir()
    (repo / "data" / "corpus.md").write_text(tiny_corpus())
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    env = cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{repo}/mlruns/mlflow.db")
    (repo / "mlruns").mkdir()

    def sh(*cmd):
        r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    sh("git", "init", "-q")
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m",
       "init")
    sh(str(BIN / "dvc"), "init", "-q")
    sh(str(BIN / "dvc"), "config", "core.analytics", "false")
    out = sh(str(BIN / "dvc"), "repro")
    for stage in ("prepare", "tokenizer", "train", "evaluate", "generate", "register"):
        assert f"Running stage '{stage}'" in out
    assert "Data and pipelines are up to date" in sh(str(BIN / "dvc"), "repro")
    lock = (repo / "dvc.lock").read_text()
    assert file_md5(repo / "data/prepared/train.txt") in lock
    assert "by_model:" in lock  # the per-model defaults are a tracked param of the train stage
    metrics = sh(str(BIN / "dvc"), "metrics", "show", "--json")
    assert "bits_per_byte" in metrics

    # Same lineage as the flow: the MLflow run's tags carry the hashes dvc.lock recorded.
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlruns/mlflow.db")
    info = json.loads((repo / "outputs/train.json").read_text())
    tags = mlflow.get_run(info["run_id"]).data.tags
    assert tags["dvc.data.train.md5"] in lock and tags["dvc.tokenizer.md5"] in lock
    assert tags["lmpipe.entry"] == "dvc"
    # ... and so does the registered version, with the commit it was made from.
    version = mlflow.MlflowClient().get_model_version("lmpipe-gpt-corpus", "1")
    for path in ("data/prepared/val.txt", "data/tokenizer/tokenizer.json"):
        md5 = version.tags[f"lmpipe.dvc.{path}.md5"]
        assert md5 == file_md5(repo / path) and md5 in lock and md5 in version.description
    assert version.tags["lmpipe.git.commit"] == sh("git", "rev-parse", "HEAD").strip()

    # A changed param re-runs training from scratch (no silent resume of old checkpoints).
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = 0.02
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(str(BIN / "dvc"), "repro")
    assert "Stage 'prepare' didn't change" in out and "Running stage 'train'" in out
    second = json.loads((repo / "outputs/train.json").read_text())
    assert second["run_id"] != info["run_id"]
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(second["run_id"], "train_loss")] == [5, 10,
                                                                                           15, 20]
    assert [Path(p).name.split("_step")[1][:4] for p in second["checkpoints"]] == ["0010", "0020"]

    # Resuming is explicit and tracked: train.resume=latest with more steps continues that run.
    params["train"].update(resume="latest", steps=30)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(str(BIN / "dvc"), "repro")
    third = json.loads((repo / "outputs/train.json").read_text())
    assert third["run_id"] == second["run_id"] and third["step"] == 30
    assert [m.step for m in client.get_metric_history(second["run_id"], "train_loss")][-2:] == [25,
                                                                                                30]
    assert "Data and pipelines are up to date" in sh(str(BIN / "dvc"), "repro")
