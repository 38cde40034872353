"""MLflow glue, the only package that imports mlflow (with lmpipe/serving.py): the store (here),
training runs and checkpoints as logged models (runs), lineage (lineage), the model registry
(registry).

The default store is embedded: an SQLite database plus artifacts under ./mlruns. MLFLOW_TRACKING_URI
selects a tracking server instead. The URI is always set explicitly: MLflow 3.17 refuses the plain
file store, and a leftover file store in ./mlruns would otherwise hijack its default.
"""
from __future__ import annotations

import os
from pathlib import Path

MLRUNS = Path("mlruns")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{MLRUNS.resolve()}/mlflow.db"


def connect() -> str:
    """Point MLflow at the store; return its URI."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI"):
        MLRUNS.mkdir(exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def setup(experiment: str) -> str:
    """Point MLflow at the store and return the experiment id (created on first use). A tracking
    server that does not answer is one clear line (buffer.TrackingUnreachable), not minutes of
    MLflow's retries."""
    import mlflow

    from lmpipe.tracking.buffer import require_reachable

    uri = connect()
    require_reachable(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        # Local store: artifacts beside the database, not in MLflow's cwd-relative default.
        location = (MLRUNS / "artifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
        return mlflow.create_experiment(experiment, artifact_location=location)
    return exp.experiment_id


def ui_hint() -> str:
    uri = tracking_uri()
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri}   (or: make ui)"
    return uri
