"""Training runs in MLflow: the run, its params and tags, step metrics, each checkpoint as a logged
model at its step, the evaluate and generate stages' results, and `lmpipe compare`'s run."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmpipe.tracking import setup
from lmpipe.tracking.lineage import lineage_tags

if TYPE_CHECKING:
    from lmpipe.config import Config


def training_run(experiment_id: str, run_name: str, resume_run_id: str | None = None):
    """A new MLflow run, or — when resuming — the checkpoint's own run, continued (same run id,
    continuous step numbers). If that run is not in this store, a new run records it as its
    parent."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if resume_run_id:
        try:
            mlflow.get_run(resume_run_id)
            return mlflow.start_run(run_id=resume_run_id)
        except MlflowException:
            return mlflow.start_run(run_name=run_name, experiment_id=experiment_id,
                                    tags={"lmpipe.parent_run_id": resume_run_id})
    return mlflow.start_run(run_name=run_name, experiment_id=experiment_id)


def mark_failed(run_id: str) -> None:
    """A run whose training process was killed, so that nothing ended it, as FAILED (a resume of it
    sets it running again)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "FAILED")


def record_resume(step: int, checkpoint: Path, schedule: dict, data: str) -> None:
    """A resume of the active run, as tags at its step: a continued run's params are immutable."""
    import mlflow

    at = f"lmpipe.resume.step{step}"
    mlflow.set_tags({at: str(checkpoint), f"{at}.schedule": str(schedule), f"{at}.data": data})


def log_run_params(run, params: dict[str, Any]) -> None:
    """The params of a new run (also one resuming an imported or foreign checkpoint); a continued
    run keeps those it has."""
    import mlflow

    if not run.data.params:
        mlflow.log_params(params)


def tag_run(inputs: dict[str, str | Path], tags: dict[str, str]) -> None:
    """The active run's lineage tags for these input files (lineage_tags), and `tags`."""
    import mlflow

    mlflow.set_tags({**lineage_tags(inputs), **tags})


def log_training_artifacts(files: list[tuple[str | Path, str]]) -> None:
    """(file, artifact folder) pairs into the active run; a file that is not there is left out."""
    import mlflow

    for path, where in files:
        if Path(path).exists():
            mlflow.log_artifact(str(path), where)


def log_eval_metrics(run_id: str, step: int, metrics: dict[str, float],
                     model_id: str | None) -> None:
    """The evaluate stage's metrics, as eval_*, on the training run and the final checkpoint's
    logged model (when there is one)."""
    import mlflow

    mlflow.log_metrics({f"eval_{k}": v for k, v in metrics.items()}, step=step, run_id=run_id,
                       model_id=model_id)


def log_samples(run_id: str, step: int, text: str) -> None:
    """The generate stage's samples, as the training run's artifact samples/step<N>.txt."""
    import mlflow

    mlflow.log_text(text, f"samples/step{step}.txt", run_id=run_id)


class MetricLog:
    """Step metrics of one run, buffered and written in batches: every `every` seconds, and on
    flush() (at each checkpoint, so the metrics up to a checkpoint are durable with it). MLflow's
    own async logging would do the same, but each of its flushes waits up to 1 s on an idle
    queue."""

    def __init__(self, run_id: str, every: float = 5.0):
        from mlflow import MlflowClient

        self.client, self.run_id, self.every = MlflowClient(), run_id, every
        self.pending: list = []
        self.last = time.monotonic()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if time.monotonic() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.pending), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=self.pending[i:i + 1000], synchronous=True)
        self.pending, self.last = [], time.monotonic()


class TrainingTracker:
    """A training run's step metrics and checkpoints in MLflow. Its methods are the training loop's
    logging hooks: train metrics every log interval, val metrics every evaluation, and each saved
    checkpoint as a logged model."""

    def __init__(self, run, experiment_id: str, cfg: Config):
        self.run_id, self.experiment_id = run.info.run_id, experiment_id
        self.params, self.log_checkpoints = cfg.flat(), cfg.tracking.log_checkpoints
        self.metrics = MetricLog(self.run_id)
        self.model_ids: dict[int, str] = {}  # step → the logged model of its checkpoint

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.log(step, metrics)

    def log_eval(self, step: int, metrics: dict[str, float], at_checkpoint: bool) -> None:
        # At a checkpoint, log_checkpoint logs val_loss linked to the checkpoint's logged model.
        if not (self.log_checkpoints and at_checkpoint):
            self.metrics.log(step, metrics)

    def flush(self) -> None:
        self.metrics.flush()

    def checkpoint_saved(self, path: Path, entry: dict) -> None:
        """A checkpoint is on disk (its manifest entry): log it as a logged model at its step.
        Runs on the checkpoint writer's thread when saves are asynchronous."""
        if self.log_checkpoints:
            step = entry["step"]
            self.model_ids[step] = log_checkpoint(self.run_id, self.experiment_id, path, step,
                                                  self.params, logged_metrics(entry))


def logged_metrics(entry: dict) -> dict[str, float]:
    """The metrics a checkpoint's MLflow logged model gets: its val_loss, unless that was measured
    at an earlier step (a save on a signal): MLflow ranks logged models by it as their own."""
    from lmpipe.ckpt.payload import current_val_loss

    val = current_val_loss(entry["metrics"], entry["step"])
    return {} if val is None else {"val_loss": val}


def log_checkpoint(run_id: str, experiment_id: str, path: Path, step: int, params: dict[str, Any],
                   metrics: dict[str, float]) -> str:
    """A checkpoint as an MLflow 3 logged model at its step: the file, its hyperparameters and
    metrics.

    They appear in the run's Models tab and rank with
    mlflow.search_logged_models(order_by=val_loss).
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    model = client.create_logged_model(
        experiment_id=experiment_id, name=f"checkpoint-step{step}", source_run_id=run_id,
        params={k: str(v) for k, v in params.items()}, model_type="lmpipe-checkpoint",
        tags={"lmpipe.step": str(step), "lmpipe.checkpoint": path.name})
    client.log_model_artifact(model.model_id, str(path))
    if metrics:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, run_id=run_id,
                           model_id=model.model_id)
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def log_comparison(experiment: str, params: dict[str, Any], metrics: dict[str, float],
                   artifacts: dict[str, str], inputs: dict[str, str | Path]) -> str:
    """`lmpipe compare` as a run of its own: the checkpoints and settings as params, each model's
    metrics, the table as text artifacts ({file name: text}), lineage tags for `inputs`."""
    import mlflow

    experiment_id = setup(experiment)
    with mlflow.start_run(run_name="compare", experiment_id=experiment_id,
                          tags={"lmpipe.kind": "compare"}) as run:
        mlflow.log_params({k: str(v) for k, v in params.items()})
        mlflow.log_metrics(metrics)
        mlflow.set_tags(lineage_tags(inputs))
        for name, text in artifacts.items():
            mlflow.log_text(text, name)
    return run.info.run_id
