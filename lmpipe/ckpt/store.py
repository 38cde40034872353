"""Checkpoint files on disk: their names, atomic saves, complete loads, listing and deleting.

A save writes a temporary file, fsyncs it, records it in the directory's manifest, then renames it
into place: every file under a checkpoint's name is complete and has a manifest entry
(ckpt/manifest.py). Loads use weights_only=True (ckpt/safeload.py).
"""
from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

from lmpipe.ckpt.manifest import is_manifest, read_manifest, update_manifest
from lmpipe.ckpt.payload import FORMAT_VERSION, REQUIRED_KEYS, strip_prefixes
from lmpipe.common.errors import UserError
from lmpipe.common.fileio import SaveAbandoned, atomic_path, stale_temporaries, write_error

NAME_RE = re.compile(r"^checkpoint_(?P<model>[a-z0-9]+)_(?P<source>.+)"
                     r"_step(?P<step>\d+)_(?P<time>\d{8}_\d{6})\.pt$")


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


def save_checkpoint(path: str | Path, payload: dict[str, Any], abort=None) -> dict[str, Any]:
    """Write atomically and record sha256/size in the manifest; return the manifest entry.

    abort: a threading.Event; if set by the time the data is written, the save is dropped
    (SaveAbandoned) and leaves nothing behind.
    """
    import torch

    path = Path(path)
    payload = {**payload, "format_version": FORMAT_VERSION}
    payload["model_state_dict"] = strip_prefixes(payload["model_state_dict"])
    entry: dict[str, Any] = {}

    def record(tmp: Path, digest: str | None) -> None:
        entry.update(file=path.name, sha256=digest, size=tmp.stat().st_size,
                     step=payload.get("step"), run_id=payload.get("run_id"),
                     metrics=_finite(payload.get("metrics", {})),
                     created=datetime.now().isoformat())
        update_manifest(path.parent, lambda m: m.__setitem__(path.name, entry))

    with atomic_path(path, before_commit=record, sha256=True) as tmp:
        try:
            # by name: torch's C++ writer, 2-3x faster than a file object
            torch.save(payload, str(tmp))
        except RuntimeError as e:
            raise write_error(tmp, e) from None
        if abort is not None and abort.is_set():
            raise SaveAbandoned
    return entry


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if v is not None and v == v and abs(v) != float("inf") else None) for k,
            v in metrics.items()}


def refuse_manifest(path: str | Path,
                    instead: str = "pass one of them, e.g. {example}, or 'latest'") -> None:
    """A manifest passed where a checkpoint belongs (`ls checkpoints/ | sort | tail -1` gave one
    before it was hidden) is a UserError saying what it is and what to pass: `instead`, in which
    {example} is the newest checkpoint beside it and {directory} its directory."""
    path = Path(path)
    if not is_manifest(path):
        return
    directory, found = path.parent, list_checkpoints(path.parent)
    what = (f"{path} is lmpipe's checkpoint manifest (the integrity record of the checkpoints in "
            f"{directory}/), not a checkpoint")
    if not found:
        raise UserError(f"{what}; there are no checkpoints in {directory}/ yet: train with "
                        "ENABLE_CHECKPOINTS=true (or: lmpipe run)")
    raise UserError(f"{what}; " + instead.format(example=found[-1], directory=directory))


def delete_checkpoint(path: Path) -> None:
    """Remove the file, then its manifest entry (a crash in between leaves a dangling entry,
    which verification reports as missing and clean_directory drops)."""
    path.unlink(missing_ok=True)
    update_manifest(path.parent, lambda m: m.pop(path.name, None))


def clean_directory(directory: str | Path) -> list[str]:
    """At start: delete temporaries of interrupted saves and manifest entries without a file."""
    directory = Path(directory)
    notes = []
    for tmp in stale_temporaries(directory):
        if tmp.is_dir():  # not lmpipe's: left alone
            continue
        tmp.unlink(missing_ok=True)
        notes.append(f"removed the temporary of an interrupted save: {tmp.name}")
    dangling = [n for n in read_manifest(directory) if not (directory / n).exists()]
    if dangling:
        update_manifest(directory, lambda m: [m.pop(n) for n in dangling])
        notes.append(f"dropped {len(dangling)} manifest entr{'y' if len(dangling) == 1 else 'ies'} "
                     "without a file")
    return notes


def load_checkpoint(path: str | Path, map_location: str = "cpu", mmap: bool = False,
                    trust_pickle: bool = False) -> dict[str, Any]:
    """Load with weights_only=True; a missing, unreadable or incomplete file is a UserError.
    mmap=True maps tensors from the file instead of reading them (metadata-only uses)."""
    from lmpipe.ckpt.safeload import Unreadable, torch_load

    path = Path(path)
    refuse_manifest(path)
    if not path.is_file():
        raise UserError(f"Checkpoint not found: {path}; check the path, list checkpoints with "
                        f"'lmpipe ckpt list {path.parent}' (or 'ls {path.parent}/'), "
                        "and train with ENABLE_CHECKPOINTS=true")
    try:
        ckpt = torch_load(path, trust_pickle, mmap, map_location)
    except Unreadable as e:
        raise UserError(f"{e}: the checkpoint is corrupted (an interrupted save, a full disk or "
                        "a bad copy); use one from an earlier step "
                        f"('lmpipe ckpt doctor {path}' names it)") from None
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise UserError(f"{path}: Checkpoint does not contain model_state_dict; "
                        f"{foreign_hint(ckpt, path)}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path}: checkpoint is missing {', '.join(missing)}; it was not written "
                        "by lmpipe or is from an incompatible version ('lmpipe ckpt doctor "
                        f"{path}' explains what to do)")
    ckpt["model_state_dict"] = strip_prefixes(ckpt["model_state_dict"])
    return ckpt


def list_checkpoints(directory: str | Path) -> list[Path]:
    """lmpipe checkpoints in `directory`, oldest first (by modification time, then step)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("checkpoint_*.pt") if p.is_file()]
    return sorted(found,
                  key=lambda p: (p.stat().st_mtime, (parse_filename(p) or {}).get("step", 0)))


def foreign_hint(obj: Any, path: Path) -> str:
    """What a file that lmpipe cannot use directly is, and what to do with it."""
    keys = set(obj) if isinstance(obj, dict) else set()
    if {"model", "model_args"} <= keys:
        return f"it is a nanoGPT checkpoint: convert it with 'lmpipe ckpt import {path}'"
    fix = "use a checkpoint from an earlier step, or re-run training with ENABLE_CHECKPOINTS=true"
    if "state_dict" in keys or is_state(obj):
        kind = ("a Lightning (or state_dict)" if "state_dict" in keys
                else "a bare state dict, not an lmpipe")
        return f"it is {kind} checkpoint ('lmpipe ckpt inspect {path}' describes it); {fix}"
    return f"the file may be corrupted or not a checkpoint; {fix}"


def is_state(obj: Any) -> bool:
    import torch

    return isinstance(obj,
                      dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


