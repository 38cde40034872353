"""Finding a checkpoint: the newest one that verifies, the one at (or nearest before) a step, or
what a path or glob names."""
from __future__ import annotations

import glob
import os
from pathlib import Path

from lmpipe.ckpt.integrity import verify_checkpoint
from lmpipe.ckpt.manifest import read_manifest
from lmpipe.ckpt.store import list_checkpoints, parse_filename, refuse_manifest
from lmpipe.common.errors import UserError, warn


def latest_verified(directory: str | Path, candidates: list[Path] | None = None) -> Path:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped, never deleted."""
    found = list_checkpoints(directory) if candidates is None else candidates
    for path in reversed(found):
        v = verify_checkpoint(path, deep=True)
        if v.ok:
            return path
        warn(f"skipping {v.status} checkpoint {path} ({v.detail}); it is kept in place")
    if not found:
        raise UserError(f"Checkpoint not found: no checkpoints in {directory}/; train first "
                        "('lmpipe run') or pass --checkpoint PATH")
    raise UserError(f"no checkpoint in {directory}/ verifies ({len(found)} checked); "
                    "retrain, or inspect them with 'lmpipe ckpt verify'")


def latest_of_run(directory: str | Path, run_id: str) -> Path | None:
    """The newest checkpoint of MLflow run `run_id` in `directory` that verifies, by the run id
    the manifest records (other runs' checkpoints may share the directory); None if it has none."""
    entries = read_manifest(directory)
    mine = sorted(((e.get("step") or 0, Path(directory) / name) for name, e in entries.items()
                   if e.get("run_id") == run_id and (Path(directory) / name).is_file()),
                  key=lambda t: (t[0], t[1].stat().st_mtime))
    if not mine:
        return None
    try:
        return latest_verified(directory, [p for _, p in mine])
    except UserError:  # none verifies (each one reported)
        return None


def resolve_step(directory: str | Path, step: int) -> Path:
    """The checkpoint at `step`, or the nearest earlier one that verifies (and say so)."""
    found = [p for p in list_checkpoints(directory) if (parse_filename(p) or {}).get("step",
                                                                                     -1) <= step]
    found.sort(key=lambda p: parse_filename(p)["step"])  # stable: newest last among equal steps
    if not found:
        steps = sorted({parse_filename(p)["step"] for p in list_checkpoints(directory)
                        if parse_filename(p)})
        raise UserError(f"Checkpoint not found: no checkpoint at or before step {step} in "
                        f"{directory}/; available steps: {', '.join(map(str, steps)) or 'none'}")
    path = latest_verified(directory, found)
    got = parse_filename(path)["step"]
    if got != step:
        warn(f"no checkpoint at step {step}; using step {got}, the nearest earlier one: {path}")
    return path


def resolve_checkpoint(spec: str, directory: str | Path, step: int | None = None) -> Path:
    """'latest' → the newest verified checkpoint in `directory` (or the nearest at/before `step`);
    a glob → its newest match; else the path."""
    if spec == "latest":
        return resolve_step(directory, step) if step is not None else latest_verified(directory)
    path = Path(os.path.expanduser(spec))
    if any(c in spec for c in "*?["):
        matches = sorted(glob.glob(os.path.expanduser(spec)), key=lambda p: Path(p).stat().st_mtime)
        if not matches:
            raise UserError(f"Checkpoint not found: nothing matches {spec!r}; list checkpoints "
                            f"with 'ls {directory}/'")
        path = Path(matches[-1])
    refuse_manifest(path)
    return path


