"""Model registry: one key per architecture, the same key as params.yaml's model.type.

Adding an architecture is local: a file with a config dataclass and a module, and one line here.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

MODELS = {
    # key: (module, config class, model class); imported lazily so `import models` stays cheap.
    "bigram": ("models.bigram", "BigramConfig", "Bigram"),
    "gpt": ("models.gpt", "GPTConfig", "GPT"),
    # nanochat's GPT, for imported checkpoints
    "nanochat": ("models.nanochat", "NanochatConfig", "Nanochat"),
    # a pretrained GPT-2 (transformers' GPT2LMHeadModel), fine-tuned
    "gpt2": ("models.gpt2", "GPT2ModelConfig", "GPT2"),
}


def build_model(config: dict[str, Any]):
    """config: {"type": key, "vocab_size": V, ...architecture keys}; keys a model does not use
    are ignored."""
    import importlib

    kind = config["type"]
    if kind not in MODELS:
        raise ValueError(f"model.type must be one of {', '.join(MODELS)}, got {kind!r}")
    module_name, config_name, model_name = MODELS[kind]
    module = importlib.import_module(module_name)
    config_cls = getattr(module, config_name)
    known = {f.name for f in fields(config_cls)}
    return getattr(module,
                   model_name)(config_cls(**{k: v for k, v in config.items() if k in known}))


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups, as in nanoGPT: weight decay on matrices, not on biases and norms.
    Training builds its optimizer from them; verifying a checkpoint's optimizer state needs the
    same order, so it lives with the models rather than with either of them."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
