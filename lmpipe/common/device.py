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
