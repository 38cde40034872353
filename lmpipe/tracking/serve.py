"""`lmpipe serve`: a registered model version, checked, then served by `mlflow models serve`.

The check comes first because MLflow would only find a missing name, version, alias or checkpoint
artifact inside its server process, as a traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from lmpipe.tracking import tracking_uri


def require_checkpoint(uri: str) -> str:
    """The model the URI names and its checkpoint artifact are in the store (tracking.uris.locate:
    UserError listing what exists otherwise); returns where the checkpoint is."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line, not bars
    from lmpipe.tracking.uris import locate

    repo, path = locate(uri)
    return f"{repo.artifact_uri.rstrip('/')}/{path}"


def serve_command(uri: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """`mlflow models serve` for this URI (this environment, no new one) and its environment:
    the tracking URI lmpipe uses, this interpreter's bin first on PATH (MLflow starts uvicorn
    from PATH)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
            "local", "-h", host, "-p", str(port)]
    return argv, env
