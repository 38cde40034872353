"""What the MLflow UI shows of lmpipe's runs: the experiment opens on its runs, runs have distinct
names, every checkpoint is a loadable pyfunc output of its run at its step, the two validation
losses have two names, and the evaluate stage scores every checkpoint on its logged model."""
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import lay_out_tiny_project

from lmpipe import stages, tracking
from lmpipe.config import ENV_VARS, load_config
from lmpipe.train.run import run_name


def test_the_experiment_is_marked_model_training_and_the_ui_url_opens_its_runs(trained):
    client = mlflow.MlflowClient(tracking.tracking_uri())
    exp_id = trained[1]["experiment_id"]
    assert client.get_experiment(exp_id).tags[tracking.KIND_TAG] == "custom_model_development"
    # An experiment made before (no kind, or one the UI inferred) is marked when next used ...
    old = client.create_experiment("old")
    inferred = client.create_experiment("inferred",
                                        tags={tracking.KIND_TAG: "genai_development_inferred"})
    # ... but a kind someone chose in the UI stays.
    chosen = client.create_experiment("chosen", tags={tracking.KIND_TAG: "genai_development"})
    for name, exp, kind in (("old", old, "custom_model_development"),
                            ("inferred", inferred, "custom_model_development"),
                            ("chosen", chosen, "genai_development")):
        assert tracking.setup(name) == exp
        assert client.get_experiment(exp).tags[tracking.KIND_TAG] == kind
    url = f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    assert tracking.runs_url(exp_id) == url
    assert tracking.ui_hint(exp_id).startswith(url + "   (after: mlflow ui --backend-store-uri ")


def test_run_names_show_the_settings_that_differ_from_params_yaml_and_differ(project,
                                                                            monkeypatch):
    base = run_name(load_config(), "corpus")
    assert base.startswith("gpt-corpus ·") and len(base) == len("gpt-corpus ·") + 4
    assert run_name(load_config(), "corpus") != base  # equal settings, distinct names
    monkeypatch.setenv("TRAINING_STEPS", "30")  # the environment counts as a difference too
    cfg = load_config("params.yaml", ["train.lr=0.003", "checkpoint.interval=5"])
    assert run_name(cfg, "corpus").startswith("gpt-corpus steps=30 lr=0.003 ·")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny pipeline run through the evaluate stage (20 steps, checkpoints at 10 and 20) in a
    project of its own (conftest's `project`, once for this module: a new store costs seconds).
    Saves are synchronous: checkpoints are logged inside the active run (test_pipeline's flow
    covers the asynchronous saves, logged on the writer's thread)."""
    root = lay_out_tiny_project(tmp_path_factory.mktemp("ui"))
    (root / "mlruns").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for var in ENV_VARS:
            mp.delenv(var, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlruns/mlflow.db")
        mp.chdir(root)
        cfg = load_config(overrides=["checkpoint.async=false"])
        stages.prepare(cfg)
        stages.build_tokenizer(cfg)
        info = stages.train(cfg)
        yield cfg, info, stages.evaluate(cfg, info)


def test_every_checkpoint_is_a_loadable_pyfunc_output_of_its_run_at_its_step(trained):
    _, info, _ = trained
    client = mlflow.MlflowClient(tracking.tracking_uri())
    run = client.get_run(info["run_id"])
    outputs = {o.step: o.model_id for o in run.outputs.model_outputs}
    assert outputs == {10: info["model_ids"]["10"], 20: info["model_ids"]["20"]}
    assert not run.inputs.model_inputs  # checkpoints are no longer shown as inputs
    model = mlflow.pyfunc.load_model(f"models:/{info['model_ids']['10']}")
    out = model.predict(pd.DataFrame({"prompt": ["Dear Agnes,"]}), params={"max_new_tokens": 5})
    assert len(out) == 1 and out[0].startswith("Dear Agnes,") and len(out[0]) == 16
    # ... and registrable, as the UI's "Register model" offers.
    version = mlflow.register_model(f"models:/{info['model_ids']['10']}", "from-a-checkpoint")
    assert version.run_id == info["run_id"]


def test_two_validation_losses_have_two_names_and_models_rank_by_the_evaluation(trained):
    _, info, result = trained
    client = mlflow.MlflowClient(tracking.tracking_uri())
    metrics = client.get_run(info["run_id"]).data.metrics
    assert "val_loss" not in metrics  # ambiguous: gone
    assert [m.step for m in client.get_metric_history(info["run_id"], "val_loss_est")] == [10, 20]
    # The evaluate stage scored every checkpoint: a row each, and eval_* on its logged model.
    assert [r["step"] for r in result["checkpoints"]] == [10, 20]
    assert set(result["checkpoints"][0]) == {"step", "checkpoint", "val_loss", "perplexity",
                                             "bits_per_byte"}
    final = result["checkpoints"][-1]
    assert final["checkpoint"] == info["checkpoint"] and final["val_loss"] == result["val_loss"]
    assert [m.step for m in client.get_metric_history(info["run_id"], "eval_val_loss")] == [10, 20]
    models = mlflow.search_logged_models(experiment_ids=[info["experiment_id"]],
                                         output_format="list", order_by=[{"field_name":
                                                                          "metrics.eval_val_loss"}])
    by_step = {int(m.tags["lmpipe.step"]): m for m in models}
    for row in result["checkpoints"]:
        logged = {x.key: (x.value, x.step) for x in by_step[row["step"]].metrics}
        assert logged["eval_val_loss"] == (pytest.approx(row["val_loss"]), row["step"])
        assert logged["eval_bits_per_byte"][0] == pytest.approx(row["bits_per_byte"])
        assert "val_loss_est" in logged and "val_loss" not in logged
    losses = [r["val_loss"] for r in result["checkpoints"]]
    assert [int(m.tags["lmpipe.step"]) for m in models] == \
        [r["step"] for r in sorted(result["checkpoints"], key=lambda r: r["val_loss"])], losses
    # outputs/metrics.json (a DVC metric) keeps its keys: the final checkpoint's numbers only.
    saved = json.loads(Path("outputs/metrics.json").read_text())
    assert set(saved) == {"val_loss", "perplexity", "bits_per_byte", "tokens", "step"}
    assert saved["step"] == 20 and saved["val_loss"] == pytest.approx(result["val_loss"])


def test_the_run_summary_says_which_loss_it_prints_and_where_the_runs_are(trained):
    from lmpipe.cli.main import summary

    _, info, result = trained
    text = summary({"train": info, "registered": {}, "metrics": result, "sample": {"text": "x"}})
    assert f"#/experiments/{info['experiment_id']}/runs?workflowType=machine_learning" in text
    assert (f"  evaluation:       {int(result['tokens'])} val tokens, final checkpoint: "
            f"val_loss {result['val_loss']:.4f}, ") in text
