"""LoRA checkpoints: adapter tensors only, plus the identity of the base model they adapt.

A LoRA checkpoint has the keys of every lmpipe checkpoint; its model_state_dict holds only the
adapter tensors (peft's names) and its base_model key names the base:
  {"name": where it is loaded from, "type": model type, "architecture": what build_model takes,
   "sha256": payload.weights_sha256 of the base weights}.
Bases: for lmpipe's gpt, a trained lmpipe gpt checkpoint (model.pretrained is its path); for gpt2
(and any other registered type), the model build_model makes from the recorded architecture (gpt2:
the pretrained model model.pretrained names). Rebuilding loads the base, hashes it and refuses a
different one, naming both.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from lmpipe.ckpt.payload import weights_sha256
from lmpipe.common.errors import UserError


class BaseProblem(UserError):
    """The base model a LoRA checkpoint records is missing or is not the one it was trained on."""


CHECKPOINT_BASES = ("gpt",)  # types whose base is an lmpipe checkpoint (model.pretrained: a path)


def is_lora_checkpoint(ckpt: dict[str, Any]) -> bool:
    return bool(ckpt.get("base_model"))


def identity(name: str, kind: str, arch: dict[str, Any], model) -> dict[str, Any]:
    arch = {k: v for k, v in arch.items() if not k.startswith("lora_")}
    return {"name": name, "type": kind, "architecture": arch,
            "sha256": weights_sha256(model.state_dict())}


def _describe(base: dict[str, Any]) -> str:
    return f"{base.get('name')} ({base.get('type')}, sha256 {str(base.get('sha256'))[:12]})"


def load_checkpoint_base(path: str | Path, what: str):
    """(checkpoint, model in eval mode) of an lmpipe checkpoint used as a LoRA base: a full,
    non-LoRA one, which must verify first (manifest sha256, or its own CRCs)."""
    from lmpipe.ckpt.integrity import require_intact
    from lmpipe.ckpt.payload import architecture, strip_prefixes
    from lmpipe.ckpt.store import load_checkpoint
    from models import build_model

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what}: base model {path} is missing; a gpt LoRA base is a trained "
                        "lmpipe gpt checkpoint (model.pretrained=PATH)")
    require_intact(path, f"LoRA base {path}", "use an intact base checkpoint")
    ckpt = load_checkpoint(path)
    if is_lora_checkpoint(ckpt):
        raise UserError(f"{what}: base model {path} is itself a LoRA checkpoint; merge it first "
                        f"(lmpipe ckpt export --merge {path}) and use the merged checkpoint")
    model = build_model(architecture(ckpt))
    try:
        model.load_state_dict(strip_prefixes(ckpt["model_state_dict"]))
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"{what}: base model {path} has weights that do not fit its own "
                        f"architecture ({first}); 'lmpipe ckpt verify {path}' says more") from None
    return ckpt, model.eval()


def build_base(base: dict[str, Any], what: str = "LoRA checkpoint"):
    """The base model a LoRA checkpoint records, checked against its sha256."""
    from models import build_model

    name = base.get("name")
    if base.get("type") in CHECKPOINT_BASES:
        if not Path(str(name)).expanduser().is_file():
            raise BaseProblem(f"{what}: its base model {_describe(base)} is missing; put that "
                            "checkpoint back at that path")
        _, model = load_checkpoint_base(name, what)
    else:
        try:
            model = build_model(base["architecture"])
        except OSError as e:
            raise BaseProblem(f"{what}: its base model {_describe(base)} cannot be loaded ({e}); "
                            "make it available (local Hugging Face cache or directory)") from None
    found = weights_sha256(model.state_dict())
    if found != base.get("sha256"):
        raise BaseProblem(f"{what}: adapters were trained on base {_describe(base)}, but the base "
                        f"found at {name} has sha256 {found[:12]}; use the base they were "
                        "trained on")
    return model


def lora_settings(model: dict[str, Any]) -> dict[str, Any]:
    """wrap_base's settings from a model section (asdict(cfg.model), or a checkpoint's)."""
    m = model
    return {"r": int(m.get("lora_r") or 0), "alpha": float(m.get("lora_alpha") or 16.0),
            "dropout": float(m.get("lora_dropout") or 0.0),
            "targets": str(m.get("lora_target_modules") or "")}


def model_section(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyperparameters.model ({} when absent)."""
    return (ckpt.get("hyperparameters") or {}).get("model") or {}


def wrap_base(model, base: dict[str, Any], settings: dict[str, Any]):
    """peft's LoRA wrapper around `model`; a target that matches nothing is one UserError line."""
    from models import lora

    try:
        return lora.wrap(model, kind=base["type"], base_identity=base, **settings)
    except ValueError as e:
        raise UserError(str(e)) from None


def lora_model_from_checkpoint(ckpt: dict[str, Any], device: str = "cpu",
                               what: str = "LoRA checkpoint"):
    """Base (identity checked) + the checkpoint's adapters, in eval mode on `device`."""
    from models import lora

    base = ckpt["base_model"]
    model = wrap_base(build_base(base, what), base, lora_settings(model_section(ckpt)))
    try:
        lora.load_adapter_state(model, ckpt["model_state_dict"])
    except ValueError as e:
        raise UserError(f"{what}: {e}; the file was edited or written by another program") \
            from None
    return model.to(device).eval()


def base_for_training(cfg, tok_loader):
    """A LoRA run's starting point: (config with the base's architecture, base model, tokenizer,
    base identity). gpt: model.pretrained is a trained lmpipe gpt checkpoint, whose architecture
    and tokenizer the run keeps; other types: build_model from the configuration (gpt2: the
    pretrained model model.pretrained names), with the prepared tokenizer (tok_loader())."""
    from lmpipe import tokenizer
    from lmpipe.ckpt.payload import architecture
    from lmpipe.config import config_from_dict
    from models import build_model

    m = cfg.model
    if m.type in CHECKPOINT_BASES:
        path = Path(m.pretrained).expanduser().resolve()
        what = f"model.pretrained={m.pretrained}"
        ckpt, model = load_checkpoint_base(path, what)
        if architecture(ckpt)["type"] != m.type:
            raise UserError(f"{what}: a {architecture(ckpt)['type']} checkpoint, not a {m.type} "
                            "one; LoRA fine-tunes a base of model.type")
        saved = config_from_dict(ckpt["hyperparameters"]).model
        cfg = replace(cfg, model=replace(saved, pretrained=m.pretrained, variant=m.variant,
                                         lora_r=m.lora_r, lora_alpha=m.lora_alpha,
                                         lora_dropout=m.lora_dropout,
                                         lora_target_modules=m.lora_target_modules))
        return cfg, model, tokenizer.from_json(ckpt["tokenizer"]), identity(
            str(path), m.type, architecture(ckpt), model)
    tok = tok_loader()
    arch = {**asdict(m), "vocab_size": tok.vocab_size}
    model = build_model(arch)
    return cfg, model, tok, identity(m.pretrained, m.type, arch, model)
