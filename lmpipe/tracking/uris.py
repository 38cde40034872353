"""A checkpoint named by an MLflow URI, as a local file. `models:/NAME/VERSION`,
`models:/NAME@ALIAS`, `models:/MODEL_ID` (a logged model) and `runs:/RUN_ID/PATH` are looked up in
the tracking store (tracking_uri()), downloaded once into the checkpoint directory's download
cache, checked, and reused while intact; any other spec (a path, a glob, 'latest') is
ckpt.locate's.

A model (a registered version, a run's logged model) holds its checkpoint where the MLmodel's
python_function artifacts entry says (registry.log_pyfunc_model logs it as the artifact
'checkpoint'); a logged model without an MLmodel holds the file itself.
"""
from __future__ import annotations

import hashlib
import posixpath
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lmpipe.ckpt.locate import resolve_checkpoint
from lmpipe.common.errors import UserError, warn
from lmpipe.tracking import tracking_uri

# Under the checkpoint directory; hidden, so `ls checkpoints/` and 'latest' see only local ones.
CACHE = ".mlflow-downloads"
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
FORMS = "models:/NAME/VERSION, models:/NAME@ALIAS, models:/MODEL_ID or runs:/RUN_ID/PATH"
SHOWN = 20  # at most this many names in a listing


@dataclass(frozen=True)
class Source:
    """Where a URI's checkpoint lies: an artifact repository MLflow resolves (repo), the path in
    it ('' for its root), the cache folder (key), and words for messages."""
    uri: str
    repo: str
    path: str
    key: tuple[str, ...]
    what: str
    others: str = ""  # what else there is, for the message when the checkpoint is gone


def is_uri(spec: str) -> bool:
    return bool(URI.match(spec))


def resolve(spec: str, directory: str | Path, step: int | None = None) -> Path:
    """A checkpoint spec → a local checkpoint file: an MLflow URI is downloaded (fetch) into
    `directory`'s download cache; anything else is ckpt.locate.resolve_checkpoint's."""
    if not is_uri(spec):
        return resolve_checkpoint(spec, directory, step)
    if not spec.startswith(("models:/", "runs:/")):
        raise UserError(f"{spec}: not a checkpoint URI; pass {FORMS}, or a path, a glob or "
                        "'latest'")
    return fetch(spec, Path(directory) / CACHE)


def fetch(uri: str, cache: Path) -> Path:
    """The checkpoint `uri` names, from the cache when it is there and intact, else downloaded."""
    from mlflow.exceptions import MlflowException

    store = tracking_uri()
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        raise UserError(f"{uri}: there is no tracking store at {store} (nothing was logged from "
                        "here yet); run the pipeline first ('lmpipe run'), or set "
                        "MLFLOW_TRACKING_URI to the store that holds the model")
    try:
        client = _client()
        source = _source(client, uri)
        folder = cache / _store_key() / Path(*[_safe(k) for k in source.key])
        return _cached(folder) or _download(source, folder, cache)
    except MlflowException as e:
        raise UserError(f"{uri}: cannot read it from the tracking store {store}: "
                        f"{str(e.message).splitlines()[0]}") from None


def _client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


def _store_key() -> str:
    """One cache per tracking store: the same URI names different models in different stores."""
    return "store-" + hashlib.sha256(tracking_uri().encode()).hexdigest()[:10]


def _safe(part: str) -> str:
    return re.sub(r"[^\w.@-]", "_", part) or "_"


# --- which model or run ------------------------------------------------------------------------

def _source(client, uri: str) -> Source:
    if uri.startswith("runs:/"):
        return _run_source(client, uri)
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return _alias_source(client, uri, name, alias)
    parts = rest.split("/")
    if len(parts) == 2 and all(parts):
        return _version_source(client, uri, *parts)
    if len(parts) == 1 and rest:
        return _logged_model_source(client, uri, rest)
    raise UserError(f"{uri}: not a model URI; pass {FORMS}")


def _missing(e) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _registered(client, uri: str, name: str):
    """The registered model `name`, or a UserError that lists the registered models."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if not _missing(e):
            raise
    names = [m.name for m in client.search_registered_models(max_results=1000)]
    listing = (f"registered models: {_listed(names)}" if names else
               "it has no registered models yet; register one with 'lmpipe stage register' "
               "(or 'lmpipe run')")
    raise UserError(f"{uri}: no registered model {name!r} in the tracking store {tracking_uri()}; "
                    f"{listing}")


def _versions(client, model) -> tuple[list[int], str]:
    """The model's version numbers, and 'versions 1, 2, 3 (aliases: champion → 2)'."""
    escaped = model.name.replace("'", "\\'")
    numbers = sorted(int(v.version) for v in client.search_model_versions(f"name = '{escaped}'"))
    aliases = ", ".join(f"{a} → {v}" for a, v in sorted(model.aliases.items()))
    text = (f"versions {_listed([str(n) for n in numbers], last=True)}" if numbers
            else "no versions")
    return numbers, text + (f" (aliases: {aliases})" if aliases else "")


def _version_source(client, uri: str, name: str, version: str) -> Source:
    model = _registered(client, uri, name)
    numbers, have = _versions(client, model)
    if version == "latest" and numbers:
        version = str(numbers[-1])
    if not version.isdigit() or int(version) not in numbers:
        what = f"no version {version}" if version.isdigit() else f"{version!r} is not a version"
        raise UserError(f"{uri}: {what} of registered model {name!r}; it has {have}")
    return Source(uri, f"models:/{name}/{int(version)}", "", ("models", name, str(int(version))),
                  f"version {int(version)} of registered model {name!r}", f"it has {have}")


def _alias_source(client, uri: str, name: str, alias: str) -> Source:
    model = _registered(client, uri, name)
    if alias not in model.aliases:
        _, have = _versions(client, model)
        raise UserError(f"{uri}: registered model {name!r} has no alias {alias!r}; it has {have}")
    # By version: an alias moves, a version's files do not.
    return _version_source(client, uri, name, str(model.aliases[alias]))


def _logged_model_source(client, uri: str, model_id: str) -> Source:
    from mlflow.exceptions import MlflowException

    try:
        client.get_logged_model(model_id)
    except MlflowException as e:
        if not _missing(e):
            raise
        registered = [m.name for m in client.search_registered_models(max_results=1000)]
        if model_id in registered:
            _, have = _versions(client, client.get_registered_model(model_id))
            raise UserError(f"{uri}: name a version or an alias of registered model "
                            f"{model_id!r}, e.g. models:/{model_id}/1 or "
                            f"models:/{model_id}@champion; it has {have}") from None
        raise UserError(f"{uri}: no logged model {model_id!r} in the tracking store "
                        f"{tracking_uri()} (a model URI is {FORMS}); registered models: "
                        f"{_listed(registered) if registered else 'none'}") from None
    return Source(uri, f"models:/{model_id}", "", ("logged-models", model_id),
                  f"logged model {model_id}")


def _run_source(client, uri: str) -> Source:
    from mlflow.exceptions import MlflowException

    run_id, _, path = uri.removeprefix("runs:/").partition("/")
    path = path.strip("/")
    try:
        run = client.get_run(run_id) if run_id else None
    except MlflowException as e:
        if not _missing(e):
            raise
        run = None
    if run is None:
        raise UserError(f"{uri}: no run {run_id!r} in the tracking store {tracking_uri()}; find "
                        "run ids with 'lmpipe runs'")
    if not path:
        raise UserError(f"{uri}: name the artifact after the run id (runs:/{run_id}/PATH); "
                        f"the run's top-level artifacts: {_run_artifacts(client, run)}")
    return Source(uri, f"runs:/{run_id}", path, ("runs", run_id, *path.split("/")),
                  f"run {run_id}'s artifact {path!r}",
                  f"the run's top-level artifacts: {_run_artifacts(client, run)}")


def _run_artifacts(client, run) -> str:
    """The run's top-level artifacts and its logged models (which runs:/ URIs reach by name)."""
    found = [a.path + ("/" if a.is_dir else "") for a in client.list_artifacts(run.info.run_id)]
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    found += sorted({f"{m.name}/ (logged model)" for m in models})
    return _listed(found) if found else "none"


def _listed(items: list[str], last: bool = False) -> str:
    """At most SHOWN of them (the last ones if `last`), and how many there are in all."""
    if len(items) <= SHOWN:
        return ", ".join(items)
    if last:
        return "…, " + ", ".join(items[-SHOWN:]) + f" ({len(items)} in all)"
    return ", ".join(items[:SHOWN]) + f", … ({len(items)} in all)"


# --- where the checkpoint is in it -------------------------------------------------------------

def _checkpoint_in(repo, source: Source) -> str:
    """The checkpoint file's path in the repository: the path itself when it is a file; in a
    model folder, what its MLmodel names; else the folder's only .pt file."""
    kind = _kind(repo, source.path)
    if kind is None:
        raise UserError(f"{source.uri}: {_gone(source)}; {source.others}")
    if kind == "file":
        if not source.path.endswith(".pt"):
            raise UserError(f"{source.uri}: {source.what} is not a checkpoint (.pt) file")
        return source.path
    listing = repo.list_artifacts(source.path or None)
    names = {posixpath.basename(a.path): a for a in listing}
    if "MLmodel" in names:
        path = posixpath.join(source.path, _from_mlmodel(repo, source, names["MLmodel"].path))
        if _kind(repo, path) != "file":
            raise UserError(f"{source.uri}: the checkpoint of {source.what} ({path}) is missing "
                            "from the artifact store: it was deleted; register the checkpoint "
                            f"again ('lmpipe stage register') or pick another; {source.others}")
        return path
    files = [a.path for a in listing if not a.is_dir and a.path.endswith(".pt")]
    if len(files) == 1:
        return files[0]
    raise UserError(f"{source.uri}: {source.what} is a folder with no MLmodel and "
                    f"{len(files) or 'no'} .pt files, so no one checkpoint; it holds: "
                    f"{_listed([posixpath.basename(a.path) for a in listing])}")


def _gone(source: Source) -> str:
    if source.repo.startswith("runs:/"):
        return f"run {source.key[1]} has no artifact {source.path!r}"
    return (f"the files of {source.what} are missing from the artifact store (deleted); register "
            "the checkpoint again ('lmpipe stage register') or pick another")


def _kind(repo, path: str) -> str | None:
    """'dir', 'file' or None (not there)."""
    if repo.list_artifacts(path or None):
        return "dir"
    if not path:
        return None
    parent = posixpath.dirname(path)
    for a in repo.list_artifacts(parent or None):
        if a.path.rstrip("/") == path:
            return "dir" if a.is_dir else "file"
    return None


def _from_mlmodel(repo, source: Source, mlmodel: str) -> str:
    """The checkpoint's path in the model folder: its python_function 'checkpoint' artifact (or
    its only artifact)."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        conf = yaml.safe_load(Path(repo.download_artifacts(mlmodel, tmp)).read_text()) or {}
    artifacts = (conf.get("flavors", {}).get("python_function") or {}).get("artifacts") or {}
    entry = artifacts.get("checkpoint") or (next(iter(artifacts.values()))
                                            if len(artifacts) == 1 else None)
    if not entry or "path" not in entry:
        raise UserError(f"{source.uri}: {source.what} is not an lmpipe model: its MLmodel has no "
                        "python_function artifact 'checkpoint'")
    return entry["path"]


# --- the cache ---------------------------------------------------------------------------------

def _cached(folder: Path) -> Path | None:
    """The checkpoint downloaded into `folder` before, if it is still the bytes downloaded (its
    manifest's sha256); a damaged one is set aside for a new download."""
    from lmpipe.ckpt.integrity import verify_checkpoint

    files = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    if len(files) == 1 and verify_checkpoint(files[0]).ok:
        return files[0]
    if folder.exists():
        warn(f"{folder}: the cached download is damaged or incomplete; downloading it again")
        shutil.rmtree(folder)
    return None


def locate(uri: str) -> tuple[object, str]:
    """Check, without downloading, that a models:/ or runs:/ URI names a checkpoint that is in the
    artifact store: (its artifact repository, the checkpoint's path in it). UserError otherwise,
    one line listing what exists (`lmpipe serve` checks this before it starts a server)."""
    from mlflow.exceptions import MlflowException

    try:
        source = _source(_client(), uri)
        repo = _repository(source)
        return repo, _checkpoint_in(repo, source)
    except MlflowException as e:
        raise UserError(f"{uri}: cannot read it from the tracking store {tracking_uri()}: "
                        f"{str(e.message).splitlines()[0]}") from None


def _repository(source: Source):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(source.repo, tracking_uri=tracking_uri(),
                                   registry_uri=tracking_uri())


def _download(source: Source, folder: Path, cache: Path) -> Path:
    """Download into a temporary folder in `cache`, check it, record its sha256 in a manifest
    there, then rename it to `folder`: a cache folder is complete or absent, and a failed download
    leaves nothing."""
    repo = _repository(source)
    path = _checkpoint_in(repo, source)
    cache.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
    try:
        (stage / "download").mkdir()
        got = Path(repo.download_artifacts(path, str(stage / "download")))
        done = stage / "done"
        done.mkdir()
        file = done / got.name
        got.replace(file)
        _check(file, source)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            done.replace(folder)
        except OSError:  # another process finished the same download first
            if not (found := _cached(folder)):
                raise
            return found
        return folder / got.name
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _check(file: Path, source: Source) -> None:
    """A complete lmpipe checkpoint whose zip records match their CRC-32s; recorded (sha256,
    size, step, run, the URI) in the folder's manifest, against which later uses check it."""
    from lmpipe.ckpt.manifest import update_manifest
    from lmpipe.ckpt.selfcheck import self_check
    from lmpipe.ckpt.store import load_checkpoint
    from lmpipe.common.fileio import file_sha256

    v = self_check(file)
    if v.status == "corrupt":
        raise UserError(f"{source.uri}: the downloaded checkpoint is corrupt ({v.detail}); the "
                        "copy in the artifact store is damaged")
    try:
        ckpt = load_checkpoint(file, mmap=True)
    except UserError as e:  # its message names the temporary download: say what it found instead
        reason = str(e).replace(f"{file}: ", "").split(";")[0]
        raise UserError(f"{source.uri}: {file.name} is not a complete lmpipe checkpoint "
                        f"({reason})") from None
    entry = {"file": file.name, "sha256": file_sha256(file), "size": file.stat().st_size,
             "step": ckpt.get("step"), "run_id": ckpt.get("run_id"), "metrics": {},
             "created": datetime.now().isoformat(), "source": source.uri}
    update_manifest(file.parent, lambda m: m.__setitem__(file.name, entry))
