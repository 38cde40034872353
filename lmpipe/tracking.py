"""MLflow glue: the tracking URI, runs, lineage tags, checkpoints as logged models, registration.

The default store is embedded: an SQLite database plus artifacts under ./mlruns. MLFLOW_TRACKING_URI
selects a tracking server instead. The URI is always set explicitly: MLflow 3.17 refuses the plain
file store, and a leftover file store in ./mlruns would otherwise hijack its default.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

MLRUNS = Path("mlruns")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{MLRUNS.resolve()}/mlflow.db"


def setup(experiment: str) -> str:
    """Point MLflow at the store and return the experiment id (created on first use)."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI"):
        MLRUNS.mkdir(exist_ok=True)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        # Local store: artifacts beside the database, not in MLflow's cwd-relative default.
        location = (MLRUNS / "artifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
        return mlflow.create_experiment(experiment, artifact_location=location)
    return exp.experiment_id


def training_run(experiment_id: str, run_name: str, resume_run_id: str | None = None):
    """A new MLflow run, or — when resuming — the checkpoint's own run, continued (same run id,
    continuous step numbers). If that run is not in this store, a new run records it as its parent."""
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


class MetricLog:
    """Step metrics of one run, buffered and written in batches: every `every` seconds, and on flush()
    (at each checkpoint, so the metrics up to a checkpoint are durable with it). MLflow's own async
    logging would do the same, but each of its flushes waits up to 1 s on an idle queue."""

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


def ui_hint() -> str:
    uri = tracking_uri()
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri}   (or: make ui)"
    return uri


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip() if out.returncode == 0 else "unknown"
    return commit + ("-dirty" if dirty and commit != "unknown" else "")


def lineage_tags(data_files: dict[str, str | Path]) -> dict[str, str]:
    """The git commit plus, for each input file, the md5 DVC records for it in dvc.lock."""
    from lmpipe.common.fileio import file_md5

    commit = git_commit()
    tags = {"mlflow.source.git.commit": commit, "lmpipe.git_commit": commit}
    for name, path in data_files.items():
        if not Path(path).exists():
            continue
        tags[f"dvc.{name}.md5"] = file_md5(path)
        tags[f"dvc.{name}.path"] = str(path)
    return tags


def log_checkpoint(run_id: str, experiment_id: str, path: Path, step: int, params: dict[str, Any],
                   metrics: dict[str, float]) -> str:
    """A checkpoint as an MLflow 3 logged model at its step: the file, its hyperparameters and metrics.

    They appear in the run's Models tab and rank with mlflow.search_logged_models(order_by=val_loss).
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


def pip_requirements() -> list[str]:
    """Explicit: inference is slow (~10 s) and drops torch's +cpu label."""
    from importlib.metadata import version

    pins = ["mlflow", "torch", "tokenizers", "pandas", "numpy", "pyyaml"]
    return [f"{p}=={version(p).split('+')[0]}" for p in pins]


def register_model(run_id: str, checkpoint: Path, name: str, step: int, params: dict[str, Any]) -> dict:
    """Log the checkpoint as a pyfunc model in the run and register it; return name, version, uri."""
    import warnings

    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    root = Path(__file__).resolve().parent.parent
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 200), ParamSpec("temperature", "double", 0.8),
                            ParamSpec("top_k", "long", 0), ParamSpec("seed", "long", 1337)]))
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*input[ _]example")  # explicit signature instead
        info = mlflow.pyfunc.log_model(
            # Models from code: the model is this file plus the code paths, nothing is pickled.
            name="model", python_model=str(root / "lmpipe" / "serving_model.py"),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(root / "lmpipe"), str(root / "models")], signature=signature,
            pip_requirements=pip_requirements(), registered_model_name=name, step=step,
            params={k: str(v) for k, v in params.items()}, await_registration_for=60)
    version = str(info.registered_model_version)
    return {"name": name, "version": version, "uri": f"models:/{name}/{version}", "model_id": info.model_id}
