"""Device selection: auto picks what exists (cuda, then mps, then cpu)."""
from __future__ import annotations

from lmpipe.common.errors import UserError


def pick_device(name: str = "auto") -> str:
    import torch

    has = {"cuda": torch.cuda.is_available(),
           "mps": getattr(torch.backends, "mps",
                          None) is not None and torch.backends.mps.is_available(),
           "cpu": True}
    if name == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if has[d])
    if name not in has:
        raise UserError(f"DEVICE={name!r} is not a device; use auto, cpu, cuda or mps")
    if not has[name]:
        raise UserError(f"DEVICE={name}: {name} is not available on this machine; use DEVICE=cpu "
                        "or DEVICE=auto")
    return name


def resolve_dtype(name: str, device: str) -> str:
    """train.dtype on `device`: float32, bfloat16 or float16 (the autocast dtype). auto is bfloat16
    on CUDA where supported, else float32; a dtype the device lacks falls back to float32 with one
    warning line (float16 needs CUDA; bfloat16 needs a CUDA card that supports it, or the CPU)."""
    import torch

    from lmpipe.common.errors import warn

    kind = device.split(":")[0]
    bf16 = kind == "cpu" or (kind == "cuda" and torch.cuda.is_bf16_supported())
    if name == "auto":
        return "bfloat16" if kind == "cuda" and bf16 else "float32"
    if (name == "float16" and kind != "cuda") or (name == "bfloat16" and not bf16):
        warn(f"train.dtype={name} is not supported on {device}; training in float32")
        return "float32"
    return name
