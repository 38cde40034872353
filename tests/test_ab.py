"""The A/B flow (flows/ab.py) on the Prefect test harness and a temporary MLflow store: N tiny
configurations as child runs of one parent run, trained at most max_concurrency at once, compared
in a table that Prefect and the parent run both hold; bad input stops it before any work."""
from __future__ import annotations

import json

import pytest
import yaml

from lmpipe.common.errors import UserError

NAMES = ["1: params.yaml", "2: model.n_embd=24", "3: train.lr=0.02"]


@pytest.mark.parametrize("configs, message", [
    ([], "needs at least two configurations; got 0"),
    ([["train.lr=0.02"]], "needs at least two configurations; got 1"),
    ([[], ["model.n_layrs=2"]], "configuration '2: model.n_layrs=2': -S: unknown key "
                                "'model.n_layrs'"),
    ([[], ["data.val_fraction=0.3"]], "changes data.val_fraction=0.3 (not 0.2)"),
    ([["train.lr=0.02"], ["train.lr=0.02"]], "are the same settings"),
    ([[], ["train.resume=latest"]], "trains every configuration from scratch"),
])
def test_bad_configurations_stop_before_any_work(project, configs, message):
    from flows.ab import plan

    with pytest.raises(UserError) as e:
        plan(configs, "params.yaml", 2)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (project / "data" / "prepared").exists()


def overlap(intervals: list[tuple]) -> int:
    """The most intervals (start, end) open at one time."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals],
                    key=lambda x: (x[0], x[1]))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


@pytest.mark.slow
def test_ab_flow_trains_children_of_one_parent_and_publishes_the_table(project, prefect_harness):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    from flows.ab import ARTIFACT_KEY, ab_test

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(steps=10, eval_interval=10)  # one checkpoint each: time is short
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(UserError, match="unknown key 'model.n_layrs'"):  # the flow says it too
        ab_test(configs=[[], ["model.n_layrs=2"]])
    assert not (project / "data" / "prepared").exists()

    state = ab_test(configs=[[], ["model.n_embd=24"], ["train.lr=0.02"]], max_concurrency=2,
                    return_state=True)
    result, flow_run_id = state.result(), state.state_details.flow_run_id

    # MLflow: a finished parent run, three children nested under it by mlflow.parentRunId.
    client = MlflowClient(f"sqlite:///{project}/mlruns/mlflow.db")
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.run_name == "ab-3configs" and parent.info.status == "FINISHED"
    assert parent.data.params["config_2"] == NAMES[1]
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == NAMES
    assert {c.info.run_id for c in children} == {r["run_id"] for r in result["runs"]}
    for c in children:
        assert c.info.status == "FINISHED" and "eval_bits_per_byte" in c.data.metrics
        assert "tracking.parent_run_id" not in c.data.params
    assert {c.data.params["model.n_embd"] for c in children} == {"16", "24"}
    for r in result["runs"]:  # each its own checkpoint directory
        assert f"checkpoints/ab/{parent.info.run_id}/" in r["checkpoint"]
    assert len({str(r["checkpoint"]).rsplit("/", 1)[0] for r in result["runs"]}) == 3

    # The table: a parent-run artifact (text and JSON) and a Prefect markdown artifact.
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"compare.md",
                                                                          "compare.json"}
    table = client.download_artifacts(parent.info.run_id, "compare.json", str(project))
    models = json.loads(open(table).read())["models"]
    assert [m["name"] for m in models] == NAMES and all(m["val_bpb"] > 0 for m in models)
    assert "val bpb" in result["table"] and all(n in result["table"] for n in NAMES)

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run_id])))
    [artifact] = [a for a in artifacts if a.key == ARTIFACT_KEY]
    assert artifact.type == "markdown" and parent.info.run_id in artifact.data
    assert all(n in artifact.data for n in NAMES) and "val bpb" in artifact.data

    # At most two trainings at once, and two did run at once (the bound, not a queue of one).
    trainings = [(t.start_time, t.end_time) for t in task_runs if t.name.startswith("train-")]
    assert len(trainings) == 3 and overlap(trainings) == 2
