"""Registered versions as the MLflow UI shows them: lineage as tags and in the description, an input
example, and the aliases challenger and champion as tracking.promote decides. The real stages on a
tiny config, one training run, a temporary SQLite store."""
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import REPO, cli_env
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

import lmpipe
from lmpipe import stages
from lmpipe.cli.main import summary
from lmpipe.common.errors import UserError
from lmpipe.common.fileio import file_sha256
from lmpipe.config import load_config
from lmpipe.tracking.versions import BPB, DATA, decide

NAME = "lmpipe-gpt-corpus"


@pytest.fixture
def trained(project):
    """One tiny training run with a checkpoint at step 10 and step 20 (worse and better)."""
    cfg = load_config("params.yaml")
    stages.prepare(cfg)
    stages.build_tokenizer(cfg)
    info = stages.train(cfg)
    assert [Path(p).name.split("_step")[1][:4] for p in info["checkpoints"]] == ["0010", "0020"]
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    return cfg, info


def at_step(info: dict, step: int) -> dict:
    """The train stage's result as if training had stopped at `step` (an earlier checkpoint)."""
    return {**info, "step": step, "checkpoint": info["checkpoints"][step // 10 - 1]}


def register(cfg, info, *overrides):
    """Evaluate `info`'s checkpoint, then register it with these overrides (as the flow does)."""
    cfg = load_config("params.yaml", list(overrides)) if overrides else cfg
    return stages.register(cfg, info, stages.evaluate(cfg, info))


def version(v: str):
    return mlflow.MlflowClient().get_model_version(NAME, v)


def aliases() -> dict[str, str]:
    return {k: str(v) for k, v in mlflow.MlflowClient().get_registered_model(NAME).aliases.items()}


def test_versions_carry_lineage_and_are_promoted_by_the_rule(trained, project):
    cfg, info = trained
    # outputs/metrics.json must be the evaluation of the checkpoint being registered.
    stages.evaluate(cfg, at_step(info, 10))
    with pytest.raises(UserError, match="not the evaluation of the step-20 checkpoint"):
        stages.register(cfg, info)
    assert not (project / "outputs/registered.json").exists()

    first = register(cfg, info)

    # A first version is the champion; the newest version is always the challenger.
    assert first["aliases"] == ["challenger", "champion"]
    assert aliases() == {"challenger": "1", "champion": "1"}
    v1 = version("1")
    tags, text = v1.tags, v1.description
    checkpoint = Path(info["checkpoint"])
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    lineage = {
        "lmpipe.run_id": info["run_id"], "lmpipe.checkpoint.step": "20",
        "lmpipe.checkpoint.file": checkpoint.name,
        "lmpipe.checkpoint.sha256": file_sha256(checkpoint),
        "lmpipe.data.fingerprint": meta["fingerprint"],
        "lmpipe.tokenizer.fingerprint": (project / "data/tokenizer/fingerprint").read_text(),
        "lmpipe.version": lmpipe.__version__,
        "lmpipe.git.commit": "unknown", "lmpipe.git.dirty": "false"}  # not a git repo
    assert {k: tags.get(k) for k in lineage} == lineage
    assert json.loads(tags["lmpipe.params"]) == json.loads(json.dumps(cfg.flat(), default=str))
    # ... and the description (markdown, rendered on the version page) shows each of them.
    shown = [v for k, v in lineage.items() if k != "lmpipe.git.dirty"]
    for value in [*shown, "| git commit | `unknown`, uncommitted changes: no |",
                  "| train.lr | `0.01` |"]:
        assert value in text, value
    metrics = json.loads((project / "outputs/metrics.json").read_text())
    assert float(tags["lmpipe.eval.bits_per_byte"]) == metrics["bits_per_byte"]
    assert tags["lmpipe.promote.decision"] == "champion"
    assert tags["lmpipe.promote.champion_bpb"] == "none"
    assert "promoted to **champion**" in text and "no champion yet" in text
    assert json.loads((project / "outputs/registered.json").read_text())["aliases"] == [
        "challenger", "champion"]
    # The version is the checkpoint's logged model from training, not a second copy of it.
    assert v1.source == f"models:/{info['final_model_id']}" == f"models:/{first['model_id']}"

    # The version page's sample request: an input example with the prompt and a predict param.
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1"))
    example = json.loads((model_dir / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["data"] == [[cfg.generate.prompt]]
    assert example["params"] == {"max_new_tokens": 16}
    assert json.dumps(example) in text  # ... and the description shows it, as a request body
    assert f"mlflow models serve -m models:/{NAME}/1 --env-manager local" in text

    # The step-10 checkpoint is worse: it stays challenger, with the decision and both numbers.
    worse = register(cfg, at_step(info, 10))
    tags = version("2").tags
    assert worse["aliases"] == ["challenger"] and aliases() == {"challenger": "2", "champion": "1"}
    assert version("2").source == f"models:/{info['model_ids']['10']}"
    ours, theirs = float(tags["lmpipe.promote.candidate_bpb"]), float(
        tags["lmpipe.promote.champion_bpb"])
    assert ours > theirs == metrics["bits_per_byte"]
    assert tags["lmpipe.promote.decision"] == "challenger"
    assert tags["lmpipe.promote.champion_version"] == "1"
    assert f"{ours:.4f} does not beat champion v1's {theirs:.4f}" in worse["decision"]
    assert worse["decision"] in version("2").description and "stays **challenger**" in version(
        "2").description

    # The run summary names the version, its alias and the decision.
    lines = summary({"train": info, "registered": worse, "metrics": metrics,
                     "sample": {"text": "..."}}).splitlines()
    assert f"  registered model: models:/{NAME}/2, alias challenger (models:/{NAME}@challenger)" \
        in lines
    assert f"  promotion:        {worse['decision']}" in lines

    # Under auto, a champion evaluated on other data is not comparable: no promotion, and why.
    other = load_config("params.yaml", ["data.seed=2"])
    stages.prepare(other)
    moved = register(other, info)
    assert moved["aliases"] == ["challenger"] and aliases() == {"challenger": "3", "champion": "1"}
    assert "champion v1 was evaluated on other data" in moved["decision"]
    assert version("3").tags["lmpipe.data.fingerprint"] != meta["fingerprint"]


def champion(bpb: str | None, data: str = "d1"):
    tags = [ModelVersionTag(DATA, data)] + ([ModelVersionTag(BPB, bpb)] if bpb else [])
    return ModelVersion(NAME, "7", 0, tags=tags)


@pytest.mark.parametrize(("rule", "bpb", "data", "theirs", "promote", "why"), [
    ("auto", 1.5, "d1", None, True, "no champion yet"),
    ("never", 1.5, "d1", None, False, "no champion yet"),
    ("always", 1.5, "d1", None, True, "no champion yet"),
    ("auto", 1.5, "d1", champion("1.6"), True, "1.5000 beats champion v7's 1.6000 on the same"),
    ("auto", 1.7, "d1", champion("1.6"), False, "1.7000 does not beat champion v7's 1.6000"),
    ("never", 1.5, "d1", champion("1.6"), False, "1.5000 beats champion v7's 1.6000"),
    ("always", 1.7, "d1", champion("1.6"), True, "1.7000 does not beat champion v7's 1.6000"),
    ("auto", 1.5, "d2", champion("1.6"), False, "v7 was evaluated on other data"),
    ("always", 1.5, "d2", champion("1.6"), True, "v7 was evaluated on other data"),
    ("auto", 1.5, "d1", champion(None), False, "v7 has no recorded lmpipe.eval.bits_per_byte"),
])
def test_the_promotion_rule(rule, bpb, data, theirs, promote, why):
    d = decide(rule, bpb, data, theirs)
    assert d.promote is promote and d.reason.startswith(f"tracking.promote={rule}: ")
    assert why in d.reason
    assert d.tags(rule)["lmpipe.promote.champion_bpb"] == (
        "1.6" if theirs and BPB in theirs.tags else "none")
    incomparable = "other data" in why or "no recorded" in why
    assert ("not comparable" in d.reason) is (rule == "auto" and incomparable)


def test_a_bad_promote_rule_is_one_line_and_nothing_is_written(project):
    r = subprocess.run([sys.executable, "-m", "lmpipe", "run", "-S", "tracking.promote=sometimes"],
                       cwd=project, env=cli_env(PYTHONPATH=str(REPO)), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr == ("lmpipe: error: tracking.promote must be one of auto, never, always, got "
                        "'sometimes' (from -S)\n")
    assert not (project / "outputs").exists() and not list((project / "mlruns").iterdir())
