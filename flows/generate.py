"""The generate flow: text from a checkpoint, as `lmpipe generate` makes it (deployment
lmpipe-generate/default)."""
from __future__ import annotations

from prefect import flow, get_run_logger

from flows.guard import guarded
from lmpipe.config import load_config
from tasks.generate import sample_checkpoint


@flow(name="lmpipe-generate", persist_result=True)  # the text stays readable from the API
@guarded
def generate(checkpoint: str = "latest", prompt: str | None = None,
             max_new_tokens: int | None = None, temperature: float | None = None,
             top_k: int | None = None, seed: int | None = None,
             overrides: list[str] | None = None, params_file: str = "params.yaml") -> str:
    """Generate text from a checkpoint; returns the text. Settings left empty come from
    params.yaml's generate section.

    Args:
        checkpoint: 'latest' (the newest checkpoint in checkpoint.dir that verifies), a path or a
            glob
        prompt: the text to continue
        max_new_tokens: how many tokens to generate
        temperature: sampling temperature
        top_k: sample from the k most likely tokens only
        seed: random seed of the sampling
        overrides: params.yaml settings as section.key=value, as `lmpipe generate -S` takes them
        params_file: the parameters file, relative to the project directory
    """
    config = load_config(params_file, overrides or []).to_dict()
    out = sample_checkpoint(config, checkpoint, prompt=prompt, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, seed=seed)
    get_run_logger().info("%s, step %s:\n%s", out["checkpoint"], out["step"], out["text"])
    return out["text"]
