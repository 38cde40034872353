"""`lmpipe serve`: a registered model version, checked, then served by `mlflow models serve`.

The check comes first because MLflow would only find a missing name, version, alias or checkpoint
artifact inside its server process, as a traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from lmpipe.common.errors import UserError
from lmpipe.tracking import tracking_uri

AGAIN = "register it again from its checkpoint ('lmpipe stage register' or 'lmpipe run')"


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias> → (name,
    version or "latest" or None, alias or None)."""
    rest = uri.removeprefix("models:/").strip("/")
    name, at, alias = rest.partition("@")
    if at:
        return name, None, alias
    name, _, version = rest.rpartition("/")
    if not name or not (version.isdigit() or version == "latest"):
        raise UserError(f"{uri}: not a model version URI; use models:/<name>/<version> or "
                        "models:/<name>@<alias>")
    return name, version, None


def resolve_version(uri: str):
    """The registered model version a models:/ URI names; one line listing what exists if none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_models_uri(uri)
    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise UserError(f"{uri}: no registered model {name!r} in {tracking_uri()}; registered "
                        f"models: {', '.join(names) or 'none (run lmpipe run first)'}") from None
    versions = client.search_model_versions(f"name = '{name}'")
    if alias:
        if alias not in model.aliases:
            have = ", ".join(f"@{a} (version {v})" for a, v in sorted(model.aliases.items()))
            raise UserError(f"{uri}: model {name!r} has no alias {alias!r}; aliases: "
                            f"{have or 'none'}; versions: {_numbers(versions)}")
        version = str(model.aliases[alias])
    elif version == "latest" and versions:
        version = str(max(int(v.version) for v in versions))
    found = [v for v in versions if str(v.version) == version]
    if not found:
        raise UserError(f"{uri}: model {name!r} has no version {version}; versions: "
                        f"{_numbers(versions)}")
    return found[0]


def _numbers(versions) -> str:
    return ", ".join(sorted((str(v.version) for v in versions), key=int)) or "none"


def require_checkpoint(uri: str) -> str:
    """The model's files and its checkpoint artifact are in the store (for models:/, those of the
    version the URI names); returns where they are. UserError (one line naming the URI, the version
    and the location) otherwise."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line, not bars
    label, where = model_location(uri)
    artifact = checkpoint_artifact(label, where)
    folder = str(Path(artifact).parent)
    if Path(artifact).name not in _listing(f"{where}/{folder}"):
        raise UserError(f"{label}: the checkpoint artifact {Path(artifact).name} is missing from "
                        f"{where}/{folder}; {AGAIN}")
    return where


def model_location(uri: str) -> tuple[str, str]:
    """(how to name the model in a message, the artifact URI of its files)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    rest = uri.removeprefix("models:/").strip("/")
    if rest == uri.strip("/"):  # runs:/<id>/<path>, a path: the model files are there
        return uri, uri
    if rest.startswith("m-") and "/" not in rest and "@" not in rest:  # a logged model's id
        try:
            return uri, MlflowClient().get_logged_model(rest).artifact_location
        except MlflowException:
            raise UserError(f"{uri}: no logged model {rest!r} in {tracking_uri()}") from None
    version = resolve_version(uri)
    where = MlflowClient().get_model_version_download_uri(version.name, version.version)
    return f"{uri} (version {version.version})", where


def checkpoint_artifact(label: str, where: str) -> str:
    """The checkpoint's path inside the model's files, as their MLmodel records it."""
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    try:
        mlmodel = yaml.safe_load(mlflow.artifacts.load_text(f"{where}/MLmodel"))
    except (MlflowException, OSError):
        raise UserError(f"{label}: no model files (MLmodel) at {where}; {AGAIN}") from None
    pyfunc = (mlmodel or {}).get("flavors", {}).get("python_function", {})
    artifact = pyfunc.get("artifacts", {}).get("checkpoint", {}).get("path")
    if artifact is None:
        raise UserError(f"{label}: not an lmpipe model (its MLmodel names no checkpoint "
                        "artifact); serve a version that 'lmpipe run' registered")
    return artifact


def _listing(folder_uri: str) -> set[str]:
    """The names of the files in an artifact folder (none if it is not there)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return {Path(f.path).name for f in mlflow.artifacts.list_artifacts(artifact_uri=folder_uri)}
    except (MlflowException, OSError):
        return set()


def serve_command(uri: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """`mlflow models serve` for this URI (this environment, no new one) and its environment:
    the tracking URI lmpipe uses, this interpreter's bin first on PATH (MLflow starts uvicorn
    from PATH)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
            "local", "-h", host, "-p", str(port)]
    return argv, env
