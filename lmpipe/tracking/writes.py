"""The MLflow writes the tracking buffer (lmpipe.tracking.buffer) carries: what each kind of
record does when it is sent, the first time or again after an outage. Each is harmless to repeat:
metrics keep their logged timestamps (the store keeps one row per run, key, step, timestamp and
value), a checkpoint's logged model is made only if the run has none READY, artifacts overwrite
themselves, and a run's end is the same end."""
from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Callable


def metric_rows(metrics: dict[str, float], step: int) -> list[dict]:
    """Metrics as journal rows, stamped now: the stamp makes sending them again harmless."""
    now = int(time.time() * 1000)
    return [{"key": k, "value": float(v), "timestamp": now, "step": step}
            for k, v in metrics.items()]


def send_metrics(op: dict, _files: list[Path]) -> None:
    """rows → the run, in batches; with "model" in the record (its id, or null: those the run
    logged at that step), as MLflow's fluent log_metrics links them to logged models."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    rows = op["rows"]
    if "model" not in op:
        client = MlflowClient(tracking_uri=op["uri"])
        for i in range(0, len(rows), 1000):  # MLflow's limit per batch
            client.log_batch(op["run_id"], synchronous=True, metrics=[
                Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in rows[i:i + 1000]])
        return
    _use(op["uri"])
    for (step, stamp), group in itertools.groupby(rows, lambda r: (r["step"], r["timestamp"])):
        mlflow.log_metrics({r["key"]: r["value"] for r in group}, step=step, timestamp=stamp,
                           run_id=op["run_id"], model_id=op["model"], synchronous=True)


def send_artifacts(op: dict, files: list[Path]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=op["uri"])
    for f, where in zip(files, op["artifact_paths"], strict=True):
        client.log_artifact(op["run_id"], str(f), where or None)


def send_end(op: dict, _files: list[Path]) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=op["uri"]).set_terminated(op["run_id"], op["status"],
                                                        op["end_time"])


def send_checkpoint(op: dict, files: list[Path], log_checkpoint: Callable[..., str]) -> str:
    """A checkpoint's logged model, made by `log_checkpoint` (lmpipe.tracking.runs) unless the run
    has it READY already, then its metrics, linked to it."""
    model_id = ready_checkpoint_model(op["uri"], op["experiment_id"], op["run_id"], op["name"])
    if model_id is None:
        from lmpipe.config import GenerateConfig

        _use(op["uri"])
        model_id = log_checkpoint(op["run_id"], files[0], op["step"], op["params"],
                                  GenerateConfig(**op["generate"]), {})
    if op["rows"]:
        send_metrics({**op, "model": model_id}, files)
    return model_id


def ready_checkpoint_model(uri: str, experiment_id: str, run_id: str, name: str) -> str | None:
    """The id of the run's READY logged model `name`; leftovers of a failed attempt (PENDING,
    FAILED) are deleted so that only one model stays."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    client = MlflowClient(tracking_uri=uri)
    found = client.search_logged_models(
        experiment_ids=[experiment_id], max_results=100,
        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'")
    ready = [m.model_id for m in found if m.status == LoggedModelStatus.READY]
    for m in found:
        if m.model_id not in ready:
            client.delete_logged_model(m.model_id)
    return ready[0] if ready else None


def _use(uri: str) -> None:
    """Point MLflow's fluent API at `uri` (what log_checkpoint and log_metrics use)."""
    import mlflow

    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)


# kind of record → its sender: (record, its files) → what the caller gets back. The checkpoint's
# needs log_checkpoint: lmpipe.tracking.runs adds it.
SENDERS: dict[str, Callable[[dict, list[Path]], Any]] = {
    "metrics": send_metrics, "artifacts": send_artifacts, "end": send_end}
