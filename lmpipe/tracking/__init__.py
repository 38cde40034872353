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
UI_ADDRESS = "http://127.0.0.1:5000"  # where `make ui` serves the local store
# MLflow 3's UI opens an experiment on the GenAI overview (traces) unless it is in "Model training"
# mode. Earlier 3.x UIs read the mode from the experiment's kind (this tag); 3.17's GenAI / Model
# training switch (remembered per browser) overrides it, so runs_url's URL also sets the switch.
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


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
        return mlflow.create_experiment(experiment, artifact_location=location,
                                        tags={KIND_TAG: TRAINING_KIND})
    kind = exp.tags.get(KIND_TAG, "no_inferred_type")
    if kind == "no_inferred_type" or kind.endswith("_inferred"):  # a kind chosen in the UI stays
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


def runs_url(experiment_id: str) -> str:
    """The UI page of the experiment's runs: `make ui`'s address for the local store, else the
    tracking server's."""
    uri = tracking_uri()
    base = UI_ADDRESS if not uri.startswith(("http://", "https://")) else uri.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_hint(experiment_id: str) -> str:
    """Where to look at the runs: their URL, and for a local store the command that serves it."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return runs_url(experiment_id)
    serve = "make ui" if "MLFLOW_TRACKING_URI" not in os.environ else \
        f"mlflow ui --backend-store-uri {uri}"
    return f"{runs_url(experiment_id)}   (after: {serve})"
