"""LoRA adapters through peft: wrap a built model, read and load only the adapter tensors, merge
them into the base weights.

The wrapped model is a peft PeftModel around the model lmpipe built (lmpipe's gpt, or the gpt2
wrapper around transformers' GPT2LMHeadModel): it is called like the model it wraps, and only the
adapter parameters require grad, so an optimizer over models.param_groups trains the adapters only.
Adapter tensor names are peft's (`base_model.model.<module>.lora_A.weight`), without the adapter
name.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

# the modules LoRA adapts when model.lora.target_modules is empty: the attention projection
# (lmpipe's gpt: nn.Linear; transformers' GPT-2: Conv1D, whose weight is stored fan-in first)
DEFAULT_TARGETS = {"gpt": ("c_attn",), "gpt2": ("c_attn",), "nanochat": ("c_q", "c_v")}
ADAPTER = "default"


def target_modules(kind: str, spec: str = "") -> list[str]:
    """model.lora.target_modules (comma-separated module names), or the architecture's default."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names:
        return names
    if kind not in DEFAULT_TARGETS:
        raise ValueError(f"LoRA has no default target modules for model.type {kind}; set "
                         "model.lora.target_modules")
    return list(DEFAULT_TARGETS[kind])


def adaptable_modules(model: nn.Module) -> list[str]:
    """The short names (last component) of the modules LoRA can adapt: Linear and Conv1D."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if name and _is_linear(m)}
    return sorted(names)


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _matches(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if name and name.rsplit(".", 1)[-1] in targets and _is_linear(m)]


def wrap(model: nn.Module, *, kind: str, r: int, alpha: float, dropout: float = 0.0,
         targets: str = "", base_identity: dict[str, Any] | None = None):
    """`model` with LoRA adapters of rank r on its target modules (peft.get_peft_model); the base
    weights are frozen. ValueError, naming the modules that exist, when no target matches.
    base_identity (JSON-able) travels with the wrapped model, for the checkpoint it is saved in."""
    from peft import LoraConfig, get_peft_model

    names = target_modules(kind, targets)
    found = _matches(model, names)
    missing = [n for n in names if not any(name.rsplit(".", 1)[-1] == n for name, _ in found)]
    if missing:
        raise ValueError(f"model.lora.target_modules {','.join(missing)} match no Linear/Conv1D "
                         f"module of the {kind} model; it has: "
                         f"{', '.join(adaptable_modules(model))}")
    conv1d = {type(m).__name__ == "Conv1D" for _, m in found}
    if len(conv1d) > 1:
        raise ValueError(f"model.lora.target_modules {','.join(names)} mix Linear and Conv1D "
                         "modules; adapt one kind at a time")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                        fan_in_fan_out=conv1d == {True}, bias="none")
    wrapped = get_peft_model(model, config)
    wrapped.base_identity = dict(base_identity or {})
    return wrapped


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def adapter_state(model: nn.Module) -> dict[str, Any]:
    """Only the adapter tensors (peft.get_peft_model_state_dict)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def load_adapter_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Load adapter tensors; ValueError naming what does not fit (a missing or reshaped tensor)."""
    from peft import set_peft_model_state_dict

    want = {k: tuple(v.shape) for k, v in adapter_state(model).items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    bad = [f"{k}: missing" for k in want if k not in have]
    bad += [f"{k}: checkpoint {have[k]}, model {want[k]}" for k in want
            if k in have and have[k] != want[k]]
    bad += [f"{k}: not in the model" for k in have if k not in want]
    if bad:
        raise ValueError("adapter tensors do not fit the model: " + "; ".join(bad[:5]))
    set_peft_model_state_dict(model, state, adapter_name=ADAPTER)


def merge(model: nn.Module) -> nn.Module:
    """The base model with the adapters merged into its weights (peft's merge_and_unload)."""
    return model.merge_and_unload()


def base_model(model: nn.Module) -> nn.Module:
    """The model peft wraps (with its adapter layers in place)."""
    return model.get_base_model()
