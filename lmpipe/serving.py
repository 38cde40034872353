"""The registered pyfunc model: prompts in, generated text out.

mlflow.pyfunc.load_model("models:/<name>/<version>").predict(pd.DataFrame({"prompt": [...]}),
params={"max_new_tokens": 100, "temperature": 0.8}) → a list of strings.
"""
from __future__ import annotations

import warnings

import mlflow.pyfunc

# The signature is given explicitly at logging time (with a params schema); MLflow's suggestion to
# infer it from type hints does not apply.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method.*")


class TextGenerator(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from lmpipe.checkpoint import load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint
        from lmpipe.device import pick_device

        self.device = pick_device("auto")
        ckpt = load_checkpoint(context.artifacts["checkpoint"])
        self.model = model_from_checkpoint(ckpt, self.device)
        self.tok = tokenizer_from_checkpoint(ckpt)

    def predict(self, context, model_input, params=None) -> list[str]:
        from lmpipe.sampling import generate_text

        p = {"max_new_tokens": 200, "temperature": 0.8, "top_k": 0, "seed": 1337, **(params or {})}
        prompts = model_input["prompt"] if hasattr(model_input, "columns") else model_input
        return [generate_text(self.model, self.tok, str(prompt), int(p["max_new_tokens"]),
                              float(p["temperature"]), int(p["top_k"]), int(p["seed"]), self.device)
                for prompt in list(prompts)]
