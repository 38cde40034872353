"""The pipeline run's Prefect artifacts: the summary and the per-checkpoint evaluation table, built
from the flow's result and read back from the Prefect API."""
import json

import pytest
import torch

from lmpipe.ckpt.store import save_checkpoint
from tasks.report import EVAL_KEY, SUMMARY_KEY, eval_table, summary_markdown


def _result(directory, evaluated=None) -> dict:
    names = []
    for step, estimate in ((10, 2.5), (20, 2.25)):
        names.append(str(directory / f"checkpoint_gpt_corpus_step{step:04d}_01012026_000000.pt"))
        save_checkpoint(names[-1], {"model_state_dict": {"w": torch.zeros(1)}, "step": step,
                                    "run_id": "r1", "metrics": {"val_loss": estimate,
                                                                "val_step": step}})
    metrics = {"val_loss": 2.3, "perplexity": 9.97, "bits_per_byte": 3.3}
    if evaluated is not None:
        metrics["checkpoints"] = evaluated
    return {"train": {"run_id": "r1", "experiment_id": "1", "checkpoint": names[-1],
                      "checkpoints": names, "checkpoint_dir": str(directory), "step": 20,
                      "model_type": "gpt", "source": "corpus"},
            "metrics": metrics, "sample": {"text": "Dear Agnes, ```quoted```"},
            "registered": {"uri": "models:/lmpipe-gpt-corpus/3"}}


def test_table_uses_the_evaluate_rows_and_falls_back_to_the_final_checkpoint(tmp_path):
    fallback = eval_table(_result(tmp_path))
    assert [(r["step"], r["val_loss"], r["val_loss_estimate"]) for r in fallback] == [
        (10, None, 2.5), (20, 2.3, 2.25)]  # the full evaluation only where it was measured
    assert fallback[1]["checkpoint"].endswith("step0020_01012026_000000.pt")
    rows = [{"step": s, "checkpoint": str(tmp_path / f"checkpoint_gpt_corpus_step{s:04d}_"
                                                     "01012026_000000.pt"),
             "val_loss": v, "perplexity": 2.0, "bits_per_byte": 1.0} for s, v in ((20, 2.3),
                                                                                   (10, 2.6))]
    table = eval_table(_result(tmp_path, rows))
    assert [(r["step"], r["val_loss"], r["val_loss_estimate"]) for r in table] == [
        (10, 2.6, 2.5), (20, 2.3, 2.25)]


def test_summary_names_the_run_checkpoint_version_metrics_and_sample(tmp_path):
    md = summary_markdown(_result(tmp_path))
    for text in ("`r1`", "step0020_01012026_000000.pt` (step 20)", "`models:/lmpipe-gpt-corpus/3`",
                 "| bits_per_byte (full validation split) | 3.3000 |"):
        assert text in md
    assert "````text\nDear Agnes, ```quoted```\n````" in md  # a fence the sample cannot close


def assert_published(result: dict) -> None:
    """The newest summary artifact is this pipeline run's (its MLflow run id), and its flow run
    also published the table, one row per checkpoint. test_pipeline's end-to-end run calls this."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        def newest(key):
            return client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1)[0]
        summary, table = newest(SUMMARY_KEY), newest(EVAL_KEY)
    t = result["train"]
    assert summary.type == "markdown" and f"`{t['run_id']}`" in summary.data
    assert result["registered"]["uri"] in summary.data and result["sample"]["text"] in summary.data
    assert table.type == "table" and table.flow_run_id == summary.flow_run_id
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["step"] for r in rows] == [int(p.split("_step")[1][:4]) for p in t["checkpoints"]]
    assert rows[-1]["bits_per_byte"] == pytest.approx(result["metrics"]["bits_per_byte"])
    assert all(r["val_loss_estimate"] > 0 for r in rows)
