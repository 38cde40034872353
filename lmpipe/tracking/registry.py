"""A checkpoint as a pyfunc model (every logged checkpoint, and the registered model version): its
signature, pins, and registration."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmpipe.config import GenerateConfig

EXAMPLE_TOKENS = 16  # the input example's max_new_tokens
SHA256 = "lmpipe.checkpoint.sha256"  # a checkpoint's logged model: the file it holds


def pip_requirements(params: dict[str, Any] | None = None) -> list[str]:
    """Explicit: inference is slow (~10 s) and drops torch's +cpu label. `params` (cfg.flat()):
    a gpt2 model also needs transformers, LoRA adapters peft."""
    from importlib.metadata import version

    params = params or {}
    pins = ["mlflow", "torch", "tokenizers", "pandas", "numpy", "pyyaml"]
    pins += ["transformers"] if params.get("model.type") == "gpt2" else []
    pins += ["peft", "transformers"] if params.get("model.lora_r") else []
    return [f"{p}=={version(p).split('+')[0]}" for p in dict.fromkeys(pins)]


def model_signature(generate: GenerateConfig):
    """The served model's signature: prompts in, text out, and predict params whose defaults are
    the generate section of the registering run's configuration."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    kind = {f.name: {"int": "long", "float": "double"}.get(str(f.type)) for f in fields(generate)}
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec(k, kind[k], v) for k, v in generate.sampling().items()]))


def input_example(generate: GenerateConfig) -> tuple:
    """A version's sample request: the configured prompt, and a predict param. MLflow checks the
    example by loading the model and predicting: a short generation keeps that well under a
    second (the default 300 tokens took ~7 s on CPU)."""
    import pandas as pd

    return pd.DataFrame({"prompt": [generate.prompt]}), {"max_new_tokens": EXAMPLE_TOKENS}


def sample_request(generate: GenerateConfig) -> str:
    """input_example as the JSON body of a POST /invocations, on one line."""
    import json

    from mlflow.models import convert_input_example_to_serving_input

    return json.dumps(json.loads(convert_input_example_to_serving_input(input_example(generate))))


def log_pyfunc_model(run_id: str, checkpoint: Path, name: str, step: int, params: dict[str, Any],
                     generate: GenerateConfig, tags: dict[str, str] | None = None, **extra):
    """Log a checkpoint as a pyfunc model (prompts in, text out) and an output of run `run_id` at
    `step`; `extra`: more pyfunc.log_model arguments. Returns its ModelInfo. The active run, if
    any, must be `run_id`; on the checkpoint writer's thread there is none."""
    import warnings

    import mlflow
    from mlflow.entities import LoggedModelOutput

    client = mlflow.MlflowClient()
    model = client.create_logged_model(
        experiment_id=client.get_run(run_id).info.experiment_id, name=name, source_run_id=run_id,
        params={k: str(v) for k, v in params.items()}, tags=tags, model_type="lmpipe-checkpoint")
    if mlflow.active_run() is None:  # else pyfunc.log_model makes it the active run's output
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    root = Path(__file__).resolve().parents[2]
    with warnings.catch_warnings():
        # explicit signature instead
        warnings.filterwarnings("ignore", message=r".*input[ _]example")
        return mlflow.pyfunc.log_model(
            # Models from code: the model is this file plus the code paths, nothing is pickled.
            model_id=model.model_id, python_model=str(root / "lmpipe" / "serving_model.py"),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(root / "lmpipe"), str(root / "models")],
            signature=model_signature(generate), pip_requirements=pip_requirements(params),
            step=step, **extra)


def checkpoint_name(step: int) -> str:
    """The name of the logged model of a run's checkpoint at `step`."""
    return f"checkpoint-step{step}"


def register_model(run_id: str, checkpoint: Path, name: str, step: int, params: dict[str, Any],
                   generate: GenerateConfig) -> dict:
    """Register the checkpoint as a version; return name, version, uri and the logged model's id.
    The version is the checkpoint's logged model, which training logged (checkpoint_model), given
    an input example; when there is none — tracking.log_checkpoints false, a model logged by an
    older lmpipe or with another prompt or predict params — a pyfunc model of the checkpoint is
    logged into the run now, as 'model'."""
    import mlflow

    model_id = checkpoint_model(run_id, checkpoint, step, generate)
    if model_id is None:
        model_id = log_pyfunc_model(run_id, checkpoint, "model", step, params, generate,
                                    input_example=input_example(generate)).model_id
    else:
        add_input_example(model_id, generate)
    version = str(mlflow.register_model(f"models:/{model_id}", name,
                                        await_registration_for=60).version)
    return {"name": name, "version": version, "uri": f"models:/{name}/{version}",
            "model_id": model_id}


def checkpoint_model(run_id: str, checkpoint: Path, step: int,
                     generate: GenerateConfig) -> str | None:
    """The id of run `run_id`'s READY logged model of this very checkpoint file at `step` (its tag
    lmpipe.checkpoint.sha256), made with this prompt and these predict params (the input example
    and the signature's defaults); else None."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    from lmpipe.common.fileio import file_sha256

    client = MlflowClient()
    models = client.search_logged_models(
        experiment_ids=[client.get_run(run_id).info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{checkpoint_name(step)}'")
    wanted = {f"generate.{k}": str(v)
              for k, v in {**generate.sampling(), "prompt": generate.prompt}.items()}
    sha = file_sha256(checkpoint)
    fits = [m.model_id for m in models
            if m.status == LoggedModelStatus.READY and m.tags.get(SHA256) == sha
            and all(m.params.get(k) == v for k, v in wanted.items())]
    return fits[0] if fits else None


def add_input_example(model_id: str, generate: GenerateConfig) -> None:
    """Give a logged model the input example log_model(input_example=...) would have (the MLmodel's
    entry and its files), as mlflow.models.set_signature updates a signature. Checkpoints are
    logged without one: MLflow checks an example by building the model and predicting, which
    during training would draw from torch's global generator (dropout's) and cost each save."""
    import tempfile

    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model
    from mlflow.models.utils import _save_example  # log_model's own writer; no public one

    client = MlflowClient()
    location = client.get_logged_model(model_id).artifact_location
    with tempfile.TemporaryDirectory() as tmp:
        mlmodel = download_artifacts(f"{location}/MLmodel", dst_path=tmp)
        model = Model.load(mlmodel)
        if model.saved_input_example_info is None:  # else: registered before
            _save_example(model, input_example(generate), tmp)
            model.save(mlmodel)
            client.log_model_artifacts(model_id, tmp)
