"""The registered pyfunc model: prompts in, generated text out.

mlflow.pyfunc.load_model("models:/<name>/<version>").predict(pd.DataFrame({"prompt": [...]}),
params={"max_new_tokens": 100, "temperature": 0.8}) → a list of strings.

Served by `mlflow models serve` (`lmpipe serve`), a request that only lmpipe can tell is wrong
(max_new_tokens ≤ 0, top_k < 0, a null prompt, one the tokenizer cannot encode) is an
MlflowException with INVALID_PARAMETER_VALUE: a 400 that names the problem, where any other
exception would be a bare "unexpected error".
"""
import math

import mlflow.pyfunc
import pandas as pd


class TextGenerator(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from lmpipe.ckpt.rebuild import load_for_inference
        from lmpipe.common.device import pick_device

        # The artifact comes back from MLflow's store (a download, a copy) with no manifest beside
        # it: the file checks itself (its zip CRCs) before anything is built from it.
        self.device = pick_device("auto")
        _, self.model, self.tok = load_for_inference(
            context.artifacts["checkpoint"], self.device, "the model's checkpoint artifact",
            "download the model again, or register it again from a checkpoint that passes 'lmpipe "
            "ckpt verify'")

    # The DataFrame hint tells MLflow to use the explicit signature given at logging time.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        from lmpipe.generate import generate_text

        p = self.settings(params)
        prompts = self.prompts(model_input)
        self.check(prompts, p)  # the whole request, before any generation
        return [generate_text(self.model, self.tok, str(prompt), int(p["max_new_tokens"]),
                              float(p["temperature"]), int(p["top_k"]), int(p["seed"]), self.device)
                for prompt in prompts]

    @staticmethod
    def prompts(model_input) -> list:
        """The prompt column (a DataFrame, a dict of columns) or the prompts themselves (a list)."""
        if isinstance(model_input, pd.DataFrame) or isinstance(model_input, dict):
            model_input = model_input["prompt"]
        return [model_input] if isinstance(model_input, str) else list(model_input)

    def check(self, prompts: list, p: dict) -> None:
        """Every problem of the request in one MlflowException (→ HTTP 400): bad sampling values,
        missing prompts, prompts the tokenizer cannot encode."""
        from mlflow.exceptions import MlflowException

        from lmpipe.common.errors import UserError

        problems = sampling_problems(p)
        for i, prompt in enumerate(prompts):
            if prompt is None or (isinstance(prompt, float) and math.isnan(prompt)):
                problems.append(f"prompt {i} is missing (null); send a string")
                continue
            try:
                self.tok.encode(str(prompt))
            except UserError as e:
                problems.append(f"prompt {i}: {e}")
        if problems:
            raise MlflowException.invalid_parameter_value("; ".join(problems))

    @staticmethod
    def settings(params: dict | None) -> dict:
        """predict's params over the generate section's defaults. Loaded through MLflow, the
        signature (tracking.registry.model_signature) has already filled in the registering run's
        values."""
        from lmpipe.config import GenerateConfig

        return {**GenerateConfig().sampling(), **(params or {})}


def sampling_problems(p: dict) -> list[str]:
    """What is wrong with predict's params (already of the signature's types), one line each."""
    rules = [("max_new_tokens", p["max_new_tokens"] > 0, "a positive integer"),
             ("temperature", p["temperature"] > 0, "a positive number"),
             ("top_k", p["top_k"] >= 0, "0 (no top-k filtering) or a positive integer")]
    return [f"params.{name} must be {want}, got {p[name]}" for name, ok, want in rules if not ok]
