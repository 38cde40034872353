"""The registered pyfunc model: prompts in, generated text out.

mlflow.pyfunc.load_model("models:/<name>/<version>").predict(pd.DataFrame({"prompt": [...]}),
params={"max_new_tokens": 100, "temperature": 0.8}) → a list of strings.
"""
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
        prompts = model_input["prompt"] if hasattr(model_input, "columns") else model_input
        return [generate_text(self.model, self.tok, str(prompt), int(p["max_new_tokens"]),
                              float(p["temperature"]), int(p["top_k"]), int(p["seed"]), self.device)
                for prompt in list(prompts)]

    @staticmethod
    def settings(params: dict | None) -> dict:
        """predict's params over the generate section's defaults. Loaded through MLflow, the
        signature (tracking.registry.model_signature) has already filled in the registering run's
        values."""
        from lmpipe.config import GenerateConfig

        return {**GenerateConfig().sampling(), **(params or {})}
