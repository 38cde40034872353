"""All checkpoint reading and writing: names, atomic saves, safe loads, finding the latest.

A checkpoint is data, not objects: state_dicts plus JSON-able metadata, loadable with
`torch.load(path, weights_only=True)`. Keys follow the seed guide (model_state_dict,
optimizer_state_dict, hyperparameters, vocab_size, block_size, batch_size, step) plus the
tokenizer JSON (inference needs no data/ directory) and a format version.
"""
from __future__ import annotations

import glob
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from lmpipe.errors import UserError
from lmpipe.fileio import atomic_open

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model_state_dict", "hyperparameters", "vocab_size", "block_size", "step", "tokenizer")
NAME_RE = re.compile(r"^checkpoint_(?P<model>[a-z0-9]+)_(?P<source>.+)_step(?P<step>\d+)_(?P<time>\d{8}_\d{6})\.pt$")
_COMPILE_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DistributedDataParallel wrappers


def checkpoint_filename(model: str, source: str, step: int, when: datetime | None = None) -> str:
    """checkpoint_{model}_{source}_step{N:04d}_{MMDDYYYY_HHMMSS}.pt, as in the seed guide."""
    when = when or datetime.now()
    return f"checkpoint_{model}_{source}_step{step:04d}_{when:%m%d%Y_%H%M%S}.pt"


def parse_filename(path: str | Path) -> dict[str, Any] | None:
    m = NAME_RE.match(Path(path).name)
    if not m:
        return None
    return {"model": m["model"], "source": m["source"], "step": int(m["step"]),
            "time": datetime.strptime(m["time"], "%m%d%Y_%H%M%S")}


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically: a crash leaves the previous file or the new one, never a partial one."""
    import torch

    payload = {**payload, "format_version": FORMAT_VERSION}
    payload["model_state_dict"] = strip_prefixes(payload["model_state_dict"])
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """Load with weights_only=True; a missing, unreadable or incomplete file is a UserError."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint not found: {path}; check the path, list checkpoints with "
                        f"'ls {path.parent}/', and train with ENABLE_CHECKPOINTS=true")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        raise UserError(f"{path}: checkpoint is corrupted or not a safe lmpipe checkpoint ({_reason(e)}); "
                        "use a checkpoint from an earlier step") from None
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise UserError(f"{path}: Checkpoint does not contain model_state_dict; the file may be corrupted "
                        "or not an lmpipe checkpoint; use one from an earlier step or re-run training")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path}: checkpoint is missing {', '.join(missing)}; it was not written by lmpipe "
                        "or is from an incompatible version")
    ckpt["model_state_dict"] = strip_prefixes(ckpt["model_state_dict"])
    return ckpt


def _reason(e: BaseException) -> str:
    """The informative line of a torch.load error (weights_only errors put it mid-message)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "Unsupported" in ln or "WeightsUnpickler" in ln]
    text = (useful or lines or [type(e).__name__])[0]
    return re.sub(r"\x1b\[[0-9;]*m", "", text)[:200]


def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        for p in _COMPILE_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def list_checkpoints(directory: str | Path) -> list[Path]:
    """lmpipe checkpoints in `directory`, oldest first (by modification time, then step)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("checkpoint_*.pt") if p.is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, (parse_filename(p) or {}).get("step", 0)))


def resolve_checkpoint(spec: str, directory: str | Path) -> Path:
    """'latest' → the newest checkpoint in `directory`; a glob → its newest match; else the path."""
    if spec == "latest":
        found = list_checkpoints(directory)
        if not found:
            raise UserError(f"Checkpoint not found: no checkpoints in {directory}/; train first "
                            "('lmpipe run') or pass --checkpoint PATH")
        return found[-1]
    if any(c in spec for c in "*?["):
        matches = sorted(glob.glob(spec), key=lambda p: Path(p).stat().st_mtime)
        if not matches:
            raise UserError(f"Checkpoint not found: nothing matches {spec!r}; list checkpoints with 'ls {directory}/'")
        return Path(matches[-1])
    return Path(spec)


def model_from_checkpoint(ckpt: dict[str, Any], device: str = "cpu"):
    """Rebuild the model from the checkpoint's own hyperparameters and load its weights."""
    from models import build_model

    model_cfg = {**ckpt["hyperparameters"]["model"], "vocab_size": ckpt["vocab_size"],
                 "block_size": ckpt["block_size"]}
    model = build_model(model_cfg)
    model.load_state_dict(ckpt["model_state_dict"])
    return model.to(device).eval()


def load_for_inference(path: str | Path, device: str = "cpu"):
    """(checkpoint dict, model in eval mode on `device`, tokenizer) from one checkpoint file."""
    ckpt = load_checkpoint(path)
    return ckpt, model_from_checkpoint(ckpt, device), tokenizer_from_checkpoint(ckpt)


def tokenizer_from_checkpoint(ckpt: dict[str, Any]):
    from lmpipe import tokenizer

    return tokenizer.from_json(ckpt["tokenizer"])
