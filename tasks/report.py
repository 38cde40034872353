"""The pipeline run's Prefect artifacts: a markdown summary (`lmpipe-summary`: metrics, checkpoint,
model version, sample) and a table of evaluation metrics per checkpoint (`lmpipe-eval`)."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from lmpipe.ckpt.manifest import read_manifest
from lmpipe.ckpt.payload import current_val_loss

SUMMARY_KEY, EVAL_KEY = "lmpipe-summary", "lmpipe-eval"  # Prefect: lowercase letters and dashes
METRICS = ("val_loss", "perplexity", "bits_per_byte")
ESTIMATE = ("val_loss_estimate: the training loop's estimate on train.eval_batches batches "
            "(recorded in the checkpoint manifest); val_loss, perplexity, bits_per_byte: the "
            "evaluate stage, on the whole validation split (evaluate.max_batches)")


@task(name="publish_report")
def publish_report(result: dict) -> None:
    """The summary and the per-checkpoint table of a pipeline run (the flow's result) as
    artifacts of its flow run."""
    create_markdown_artifact(summary_markdown(result), key=SUMMARY_KEY,
                             description="lmpipe run summary")
    create_table_artifact(eval_table(result), key=EVAL_KEY,
                          description="Evaluation metrics per checkpoint. " + ESTIMATE)


def summary_markdown(result: dict) -> str:
    """The run at a glance: MLflow run, checkpoints, registered version, metrics and a sample."""
    t, metrics, reg = result["train"], result["metrics"], result.get("registered") or {}
    rows = [("MLflow run", f"`{t['run_id']}` (experiment {t['experiment_id']})"),
            ("final checkpoint", f"`{t['checkpoint']}` (step {t['step']})"),
            ("checkpoints", f"{len(t['checkpoints'])} saved in `{t['checkpoint_dir']}/`"),
            ("model version", f"`{reg['uri']}`" if reg.get("uri") else "(registration off)")]
    rows += [(f"{k} (full validation split)", f"{metrics[k]:.4f}") for k in METRICS]
    sample = result["sample"]["text"]
    fence = "`" * max(3, _longest_backtick_run(sample) + 1)
    return "\n".join([f"# lmpipe run: {t['model_type']} on {t['source']}", "",
                      "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
                      "## Sample", "", f"{fence}text", sample, fence, ""])


def eval_table(result: dict) -> list[dict]:
    """One row per checkpoint of the run, by step: the evaluate stage's metrics where it has them
    (metrics["checkpoints"]; without that key, the final checkpoint's metrics), and the
    training-time val_loss_estimate where the manifest records one."""
    t, metrics = result["train"], result["metrics"]
    evaluated = {Path(r["checkpoint"]).name: r for r in metrics.get("checkpoints") or []} or {
        Path(t["checkpoint"]).name: {**metrics, "step": t["step"]}}
    manifest = read_manifest(t["checkpoint_dir"])
    table = []
    for name in dict.fromkeys([*(Path(p).name for p in t["checkpoints"]), *evaluated]):
        entry, row = manifest.get(name) or {}, evaluated.get(name) or {}
        step = row.get("step", entry.get("step"))
        if step is None:  # deleted by retention, and not evaluated
            continue
        table.append({"step": step, "checkpoint": name, **{k: row.get(k) for k in METRICS},
                      "val_loss_estimate": current_val_loss(entry.get("metrics") or {}, step)})
    return sorted(table, key=lambda r: r["step"])


def _longest_backtick_run(text: str) -> int:
    longest = run = 0
    for c in text:
        run = run + 1 if c == "`" else 0
        longest = max(longest, run)
    return longest
