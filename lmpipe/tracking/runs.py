"""Training runs in MLflow: the run, its params and tags, step metrics, each checkpoint as a logged
model at its step, the evaluate and generate stages' results, and `lmpipe compare`'s run.

Two validation losses, two names: val_loss_est is the training loop's estimate (train.eval_batches
random batches, every train.eval_interval steps); eval_val_loss (with eval_perplexity and
eval_bits_per_byte) is the evaluate stage's, on the val split in order, logged for every checkpoint
on its logged model: the one to rank checkpoints and compare runs by."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmpipe.tracking import buffer, registry, setup, tracking_uri, writes
from lmpipe.tracking.lineage import lineage_tags

if TYPE_CHECKING:
    from lmpipe.config import Config, GenerateConfig


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


def record_resume(step: int, checkpoint: Path, schedule: dict, data: str,
                  world_size: int = 1) -> None:
    """A resume of the active run, as tags at its step: a continued run's params are immutable
    (world_size: the training processes from this step on; the param is the first segment's)."""
    import mlflow

    at = f"lmpipe.resume.step{step}"
    mlflow.set_tags({at: str(checkpoint), f"{at}.schedule": str(schedule), f"{at}.data": data,
                     f"{at}.world_size": str(world_size)})


# Settings that place a run rather than shape the model: the run's parent tag and name show them.
NOT_PARAMS = ("tracking.parent_run_id", "tracking.run_name")


def log_run_params(run, params: dict[str, Any]) -> None:
    """The params of a new run (also one resuming an imported or foreign checkpoint), less
    NOT_PARAMS; a continued run keeps those it has."""
    import mlflow

    if not run.data.params:
        mlflow.log_params({k: v for k, v in params.items() if k not in NOT_PARAMS})


def place_run(run_id: str, parent_run_id: str, name: str) -> None:
    """An A/B child: its parent (the mlflow.parentRunId tag the UI nests runs by) and its name,
    when given (tracking.parent_run_id, tracking.run_name)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if parent_run_id:
        client.set_tag(run_id, "mlflow.parentRunId", parent_run_id)
    if name:
        client.update_run(run_id, name=name)


def start_parent_run(experiment: str, name: str, params: dict[str, Any],
                     tags: dict[str, str]) -> str:
    """A run that others join as children (the A/B flow's), left running; returns its id."""
    from mlflow import MlflowClient

    experiment_id = setup(experiment)
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value))
    return run.info.run_id


def end_run(run_id: str, ok: bool) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, "FINISHED" if ok else "FAILED")


def tag_run(inputs: dict[str, str | Path], tags: dict[str, str]) -> None:
    """The active run's lineage tags for these input files (lineage_tags), and `tags`."""
    import mlflow

    mlflow.set_tags({**lineage_tags(inputs), **tags})


def log_training_artifacts(files: list[tuple[str | Path, str | None]]) -> None:
    """(file, artifact folder or None: the root) pairs into the active run; a file that is not there
    is left out."""
    import mlflow

    files = [(Path(path), where) for path, where in files if Path(path).exists()]
    buffer.submit("artifacts", tracking_uri(), mlflow.active_run().info.run_id, senders(),
                  files=[f for f, _ in files], artifact_paths=[w for _, w in files])


def log_eval_metrics(run_id: str, step: int, metrics: dict[str, float],
                     model_id: str | None) -> None:
    """The evaluate stage's metrics of the checkpoint at `step`, as eval_*, on the training run and
    that checkpoint's logged model (when there is one)."""
    flush_pending()
    buffer.submit("metrics", tracking_uri(), run_id, senders(), model=model_id,
                  rows=writes.metric_rows({f"eval_{k}": v for k, v in metrics.items()}, step))


def log_samples(run_id: str, step: int, text: str) -> None:
    """The generate stage's samples, as the training run's artifact samples/step<N>.txt."""
    flush_pending()
    buffer.log_text(tracking_uri(), run_id, text, f"samples/step{step}.txt", senders())


class MetricLog:
    """Step metrics of one run, buffered and written in batches: every `every` seconds, and on
    flush() (at each checkpoint, so the metrics up to a checkpoint are durable with it). MLflow's
    own async logging would do the same, but each of its flushes waits up to 1 s on an idle
    queue. Each batch goes through the tracking buffer (lmpipe.tracking.buffer)."""

    def __init__(self, run_id: str, every: float = 5.0):
        self.run_id, self.every, self.uri = run_id, every, tracking_uri()
        self.pending: list[dict] = []
        self.last = time.monotonic()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.pending += writes.metric_rows(metrics, step)
        if time.monotonic() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            buffer.record("metrics", self.uri, self.run_id, rows=self.pending)
        buffer.retry(self.uri, senders(), self.run_id, ("metrics",))
        self.pending, self.last = [], time.monotonic()


class TrainingTracker:
    """A training run's step metrics and checkpoints in MLflow. Its methods are the training loop's
    logging hooks: train metrics every log interval, val metrics every evaluation, and each saved
    checkpoint as a logged model."""

    def __init__(self, run, experiment_id: str, cfg: Config):
        self.run_id, self.experiment_id = run.info.run_id, experiment_id
        self.params = {k: v for k, v in cfg.flat().items() if k not in NOT_PARAMS}
        self.log_checkpoints = cfg.tracking.log_checkpoints
        place_run(self.run_id, cfg.tracking.parent_run_id, cfg.tracking.run_name)
        self.generate = cfg.generate  # the defaults of each checkpoint model's predict params
        self.metrics = MetricLog(self.run_id)
        self.model_ids: dict[int, str] = {}  # step → the logged model of its checkpoint
        flush_pending()  # what earlier runs left in the tracking buffer

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.log(step, metrics)

    def log_eval(self, step: int, metrics: dict[str, float], at_checkpoint: bool) -> None:
        # At a checkpoint, log_checkpoint logs it linked to the checkpoint's logged model.
        if not (self.log_checkpoints and at_checkpoint):
            self.metrics.log(step, {ESTIMATE: metrics["val_loss"]})

    def flush(self) -> None:
        self.metrics.flush()

    def checkpoint_saved(self, path: Path, entry: dict) -> None:
        """A checkpoint is on disk (its manifest entry): log it as a logged model at its step.
        Runs on the checkpoint writer's thread when saves are asynchronous."""
        if self.log_checkpoints:
            step = entry["step"]
            sent, model_id = buffer.submit(  # log_checkpoint, through the tracking buffer
                "checkpoint", self.metrics.uri, self.run_id, senders(), files=[path],
                experiment_id=self.experiment_id, step=step, name=registry.checkpoint_name(step),
                params=self.params, generate=asdict(self.generate),
                rows=writes.metric_rows(logged_metrics(entry), step))
            if sent:
                self.model_ids[step] = model_id


ESTIMATE = "val_loss_est"  # the training loop's val_loss (the checkpoint payload's name for it)


def logged_metrics(entry: dict) -> dict[str, float]:
    """The metrics a checkpoint's MLflow logged model gets from training: its val_loss_est, unless
    that was measured at an earlier step (a save on a signal), so it is never another step's."""
    from lmpipe.ckpt.payload import current_val_loss

    val = current_val_loss(entry["metrics"], entry["step"])
    return {} if val is None else {ESTIMATE: val}


def log_checkpoint(run_id: str, path: Path, step: int, params: dict[str, Any],
                   generate: GenerateConfig, metrics: dict[str, float]) -> str:
    """A checkpoint as an MLflow 3 logged model, an output of its run at its step: a pyfunc model
    over the file (loadable as models:/<model_id>, registrable), with its hyperparameters and
    metrics. Returns the model id. Its tag lmpipe.checkpoint.sha256 lets registry.register_model
    register it when this checkpoint becomes a version.

    The evaluate stage adds its eval_* metrics, by which the UI's Models tab and
    mlflow.search_logged_models(order_by=...) rank the checkpoints.
    """
    import mlflow

    from lmpipe.ckpt.manifest import recorded_sha256

    tags = {"lmpipe.step": str(step), "lmpipe.checkpoint": path.name,
            registry.SHA256: recorded_sha256(path)}  # just saved: no second read of the file
    info = registry.log_pyfunc_model(run_id, path, registry.checkpoint_name(step), step, params,
                                     generate, tags=tags)
    if metrics:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, run_id=run_id,
                           model_id=info.model_id)
    return info.model_id


def senders() -> dict[str, buffer.Sender]:
    """What sends each kind of tracking-buffer record: the buffer's own, and log_checkpoint."""
    return {**writes.SENDERS,
            "checkpoint": lambda op, files: writes.send_checkpoint(op, files, log_checkpoint)}


def flush_pending() -> None:
    """Send what earlier commands left in the tracking buffer for this store, if it answers."""
    buffer.flush_pending(tracking_uri(), senders())


def ended(active_run):
    """training_run's run, ended whether or not the tracking server answers then (buffer)."""
    return buffer.outlasting(active_run, tracking_uri(), senders())


def log_comparison(experiment: str, params: dict[str, Any], metrics: dict[str, float],
                   artifacts: dict[str, str], inputs: dict[str, str | Path]) -> str:
    """`lmpipe compare` as a run of its own: the checkpoints and settings as params, each model's
    metrics, the table as text artifacts ({file name: text}), lineage tags for `inputs`."""
    import mlflow

    experiment_id = setup(experiment)
    flush_pending()
    with mlflow.start_run(run_name="compare", experiment_id=experiment_id,
                          tags={"lmpipe.kind": "compare"}) as run:
        log_comparison_into(run.info.run_id, params, metrics, artifacts, inputs)
    return run.info.run_id


def log_comparison_into(run_id: str, params: dict[str, Any], metrics: dict[str, float],
                        artifacts: dict[str, str], inputs: dict[str, str | Path]) -> None:
    """log_comparison's content into an existing run (the A/B flow's parent run)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    MlflowClient().log_batch(
        run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in lineage_tags(inputs).items()])
    for name, text in artifacts.items():
        MlflowClient().log_text(run_id, text, name)
