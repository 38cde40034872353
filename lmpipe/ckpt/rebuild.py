"""A checkpoint back into a model: its architecture, a built model with its weights, its tokenizer,
and the checks that the weights and the optimizer state fit what they claim to be."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lmpipe.ckpt.integrity import require_intact
from lmpipe.ckpt.payload import architecture
from lmpipe.ckpt.store import load_checkpoint
from lmpipe.common.errors import UserError


def check_optimizer_state(ckpt: dict[str, Any], optimizer, path: str | Path) -> None:
    """Refuse optimizer state that does not fit the model's parameter groups (count, shapes) or
    holds NaN/Inf, with the command that resumes anyway."""
    import torch

    fix = "resume with --no-optimizer --warmup K to restart the optimizer with a short LR re-warmup"
    saved = ckpt.get("optimizer_state_dict")
    if not saved or "param_groups" not in saved:
        raise UserError(f"{path}: checkpoint has no optimizer state; {fix}")
    now, then = optimizer.param_groups, saved["param_groups"]
    if [len(g["params"]) for g in now] != [len(g["params"]) for g in then]:
        raise UserError(f"{path}: optimizer state has parameter groups of sizes "
                        f"{[len(g['params']) for g in then]}, the model has "
                        f"{[len(g['params']) for g in now]}; {fix}")
    params = [p for g in now for p in g["params"]]
    for idx, st in saved.get("state", {}).items():
        for key, value in st.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            if value.shape != params[idx].shape:
                raise UserError(f"{path}: optimizer {key} of parameter {idx} has shape "
                                f"{tuple(value.shape)}, the parameter has "
                                f"{tuple(params[idx].shape)}; {fix}")
            if not torch.isfinite(value).all():
                raise UserError(f"{path}: optimizer {key} of parameter {idx} contains NaN or Inf; "
                                f"{fix}")


def model_from_checkpoint(ckpt: dict[str, Any], device: str = "cpu"):
    """The one way from a checkpoint to a model: build the architecture it declares, check that its
    weights fit, load them. Resume, inference, serving and import all come here. A LoRA
    checkpoint: its base (identity checked) with its adapters (ckpt/lora.py)."""
    from lmpipe.ckpt.lora import is_lora_checkpoint, lora_model_from_checkpoint
    from models import build_model

    if is_lora_checkpoint(ckpt):
        return lora_model_from_checkpoint(ckpt, device)

    arch = architecture(ckpt)
    model = build_model(arch)
    reshaped, missing, _ = _misfit(ckpt["model_state_dict"], model)
    if reshaped or missing:
        lines = [f"{k}: checkpoint {a}, model {b}" for k, a, b in reshaped[:5]]
        raise UserError(f"checkpoint weights do not fit a {arch['type']} model built from its own "
                        "hyperparameters "
                        f"({'; '.join(lines) or 'missing ' + ', '.join(missing[:5])}); the file "
                        "was edited or written by another program")
    model.load_state_dict(ckpt["model_state_dict"], strict=False)
    return model.to(device).eval()


EARLIER = "use one from an earlier step ('lmpipe ckpt doctor {path}' names it)"
def load_for_inference(path: str | Path, device: str = "cpu", what: str = "the checkpoint",
                       fix: str = EARLIER):
    """(checkpoint dict, model in eval mode on `device`, tokenizer) from one checkpoint file, which
    must verify first (manifest sha256, or its own CRCs): damaged weights never generate text."""
    require_intact(path, what, fix.format(path=path))
    ckpt = load_checkpoint(path)
    return ckpt, model_from_checkpoint(ckpt, device), tokenizer_from_checkpoint(ckpt)


def tokenizer_from_checkpoint(ckpt: dict[str, Any]):
    from lmpipe import tokenizer

    return tokenizer.from_json(ckpt["tokenizer"])


def check_optimizer_fits(optimizer_state: dict, arch: dict[str, Any], path: str | Path) -> None:
    """check_optimizer_state against an AdamW over a model built from `arch`: only the parameter
    order and shapes matter, so no weights are loaded."""
    import torch

    from models import build_model, param_groups

    optimizer = torch.optim.AdamW(param_groups(build_model(arch), 0.0))
    check_optimizer_state({"optimizer_state_dict": optimizer_state}, optimizer, path)


def shape_mismatches(state: Any, arch: dict[str, Any]) -> tuple[list[tuple[str, tuple, tuple]],
                                                                list[str], list[str]]:
    """Compare a state dict with a model built from `arch`: (reshaped, missing, unexpected).
    Verify and doctor check a checkpoint of any format this way, without loading its weights."""
    from models import build_model

    return _misfit(state, build_model(arch))


def _misfit(state: Any, model) -> tuple[list[tuple[str, tuple, tuple]], list[str], list[str]]:
    from lmpipe.ckpt.views import shape_of

    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    have = {k: shape_of(state, k)[0] for k in state if not is_mask_buffer(k)}
    reshaped = [(k, have[k], expected[k]) for k in have if k in expected and have[k] != expected[k]]
    return reshaped, sorted(set(expected) - set(have)), sorted(set(have) - set(expected))


def is_mask_buffer(name: str) -> bool:
    # nanoGPT/HF causal masks
    return name.endswith(".attn.bias") or name.endswith(".attn.masked_bias")


