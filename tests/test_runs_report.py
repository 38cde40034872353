"""`lmpipe runs`: an experiment's runs side by side — the params that differ, each metric's last
value, the registered versions and their aliases — and one line for an unknown experiment or run."""
from __future__ import annotations

import pytest

from lmpipe import stages
from lmpipe.cli.main import main
from lmpipe.config import load_config


def train(lr: str, register: bool) -> dict:
    cfg = load_config("params.yaml", ["train.steps=10", f"train.lr={lr}",
                                      "tracking.log_checkpoints=false"], env={})
    info = stages.train(cfg)
    if not register:
        return info
    return {**info, **stages.register(cfg, info, stages.evaluate(cfg, info))}


def test_two_runs_side_by_side(project, capsys):
    """One test, as a fresh MLflow store costs seconds to create: an empty experiment, an unknown
    one, then two runs (one registered, aliased champion) and an unknown run id."""
    import mlflow

    from lmpipe import tracking
    from lmpipe.tracking.report import runs_table

    tracking.setup("lmpipe-test")
    capsys.readouterr()  # MLflow's lines as it creates the store
    assert main(["runs"]) == 0 and capsys.readouterr().out == "no runs\n"
    assert main(["runs", "--experiment", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no experiment 'nope' in sqlite:" in err
    assert "experiments: Default, lmpipe-test" in err

    cfg = load_config("params.yaml", env={})
    stages.prepare(cfg)
    stages.build_tokenizer(cfg)
    first, second = train("0.01", register=True), train("0.005", register=False)
    mlflow.MlflowClient().set_registered_model_alias(first["name"], "champion", first["version"])

    df = runs_table("lmpipe-test").set_index("run_id")
    a, b = first["run_id"][:8], second["run_id"][:8]
    assert list(df.index) == [b, a]  # newest first
    # params: only those that differ; both runs trained with train.steps=10
    assert "train.lr" in df.columns and "train.steps" not in df.columns
    assert "model.n_layer" not in df.columns
    assert {df.loc[a, "train.lr"], df.loc[b, "train.lr"]} == {"0.01", "0.005"}
    # metrics: the last value of each, as MLflow holds it
    history = mlflow.MlflowClient().get_metric_history(first["run_id"], "train_loss")
    assert df.loc[a, "train_loss"] == pytest.approx(max(history, key=lambda m: m.step).value)
    assert df[["train_loss", "val_loss_est"]].notna().all().all()
    # the registry: the first run's version and its alias; the second run registered none
    assert df.loc[a, "version"] == f"{first['name']}/{first['version']}"
    assert df.loc[a, "aliases"] == "challenger, champion"  # the first version: both
    assert df.loc[b, ["version", "aliases"]].isna().all()

    # --compare: the runs named (ids or 8+ character prefixes), in that order, as the CLI prints it
    capsys.readouterr()
    assert main(["runs", "--compare", a, second["run_id"]]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 3 and a in lines[1].split() and b in lines[2].split()  # names have spaces
    assert "train.lr" in lines[0] and "champion" in lines[1]
    # ... and the same comparison in the MLflow UI (`make ui`)
    experiment = first["experiment_id"]
    assert err.strip() == ("compare them in the MLflow UI: http://127.0.0.1:5000/#/compare-runs?"
                           f'runs=["{first["run_id"]}","{second["run_id"]}"]'
                           f'&experiments=["{experiment}"]')

    # an id that is no run of the experiment: one line listing its runs
    assert main(["runs", "--compare", a, "0123456789abcdef"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--compare 0123456789abcdef: is not a run of experiment " \
        "'lmpipe-test'" in err and f"{a} (" in err and f"{b} (" in err
