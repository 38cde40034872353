"""A checkpoint as a pyfunc model (every logged checkpoint, and the registered model version): its
signature, pins, and registration."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmpipe.config import GenerateConfig

EXAMPLE_TOKENS = 16  # the input example's max_new_tokens


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


def register_model(run_id: str, checkpoint: Path, name: str, step: int, params: dict[str, Any],
                   generate: GenerateConfig) -> dict:
    """Log the checkpoint as a pyfunc model in the run and register it; return name, version, uri.
    `generate`: the run's generate section, the defaults of predict's params."""
    info = log_pyfunc_model(run_id, checkpoint, "model", step, params, generate,
                            input_example=input_example(generate),
                            registered_model_name=name, await_registration_for=60)
    version = str(info.registered_model_version)
    return {"name": name, "version": version, "uri": f"models:/{name}/{version}",
            "model_id": info.model_id}
