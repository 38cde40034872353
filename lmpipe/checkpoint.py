"""All checkpoint reading and writing: names, atomic saves, the integrity manifest, safe loads,
verification, finding the latest or a given step.

A checkpoint is data, not objects: state_dicts plus JSON-able metadata, loadable with
`torch.load(path, weights_only=True)`. Keys follow the seed guide (model_state_dict,
optimizer_state_dict, hyperparameters, vocab_size, block_size, batch_size, step) plus the
tokenizer JSON (inference needs no data/ directory), the full training state and a format version.

Each directory has a manifest, .manifest.json, recording every checkpoint's sha256, size, step,
metrics and run id. A save writes a temporary file, fsyncs it, records it in the manifest, then
renames it into place: every file under a checkpoint's name is complete and has a manifest entry.
A file without an entry (a copy, a download) is checked against its own zip CRC-32s (selfcheck.py).
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from lmpipe.errors import UserError
from lmpipe.fileio import (SaveAbandoned, atomic_path, atomic_write_text, file_sha256, stale_temporaries,
                           write_error)
from lmpipe.selfcheck import Verification, self_check

FORMAT_VERSION = 2  # 2: adds train_state (bit-exact resume) and the manifest
# Hidden, so that the seed guide's `ls checkpoints/ | sort | tail -1` gives a checkpoint.
MANIFEST = ".manifest.json"
OLD_MANIFEST = "manifest.json"  # earlier versions' name: still read, replaced at the next write
MANIFEST_FORMAT = "lmpipe-checkpoint-manifest"
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
                     metrics=_finite(payload.get("metrics", {})), created=datetime.now().isoformat())
        _update_manifest(path.parent, lambda m: m.__setitem__(path.name, entry))

    with atomic_path(path, before_commit=record, sha256=True) as tmp:
        try:
            torch.save(payload, str(tmp))  # by name: torch's C++ writer, 2-3x faster than a file object
        except RuntimeError as e:
            raise write_error(tmp, e) from None
        if abort is not None and abort.is_set():
            raise SaveAbandoned
    return entry


def current_val_loss(metrics: dict[str, Any], step: int | None) -> float | None:
    """metrics["val_loss"] if it was measured at `step`, else None: a checkpoint saved on a signal
    between evaluations carries the last evaluation's loss, with its step as val_step. Checkpoints
    from before val_step was recorded keep their value."""
    val_step = metrics.get("val_step")
    return None if val_step is not None and val_step != step else metrics.get("val_loss")


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if v is not None and v == v and abs(v) != float("inf") else None) for k, v in metrics.items()}


# --- manifest ----------------------------------------------------------------------------------

def manifest_path(directory: str | Path) -> Path:
    """The directory's manifest: .manifest.json, or an earlier version's manifest.json if that is
    all there is."""
    new, old = Path(directory) / MANIFEST, Path(directory) / OLD_MANIFEST
    return old if old.exists() and not new.exists() else new


def read_manifest(directory: str | Path) -> dict[str, dict[str, Any]]:
    """{file name: {sha256, size, step, run_id, metrics, created}}; {} if there is none."""
    path = manifest_path(directory)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())["checkpoints"]
    except (ValueError, KeyError):
        warn(f"{path}: unreadable manifest; checkpoints in {directory} will be verified by loading them")
        return {}


def _update_manifest(directory: Path, change) -> None:
    entries = read_manifest(directory)
    change(entries)
    atomic_write_text(directory / MANIFEST, json.dumps(
        {"format": MANIFEST_FORMAT, "version": 1, "checkpoints": entries}, indent=1) + "\n")
    old = directory / OLD_MANIFEST
    if _json_format(old) == MANIFEST_FORMAT:  # migrated: its entries are in the new one now
        old.unlink(missing_ok=True)


def _json_format(path: Path) -> str | None:
    """The "format" field of a JSON file of reasonable size; None for anything else."""
    try:
        if path.suffix != ".json" or not path.is_file() or path.stat().st_size > 64 << 20:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def is_manifest(path: str | Path) -> bool:
    """lmpipe's manifest under either name, or any JSON file that says it is one."""
    path = Path(path)
    return path.name in (MANIFEST, OLD_MANIFEST) or _json_format(path) == MANIFEST_FORMAT


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
    _update_manifest(path.parent, lambda m: m.pop(path.name, None))


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
        _update_manifest(directory, lambda m: [m.pop(n) for n in dangling])
        notes.append(f"dropped {len(dangling)} manifest entr{'y' if len(dangling) == 1 else 'ies'} without a file")
    return notes


def verify_checkpoint(path: str | Path, deep: bool = False) -> Verification:
    """Check size and sha256 against the manifest; a file without an entry (a copy, a download)
    checks itself (selfcheck.self_check: every zip record against its CRC-32). deep=True also loads
    such a file (weights_only) and accepts it only if it is a complete lmpipe checkpoint."""
    path = Path(path)
    if not path.is_file():
        return Verification("missing", f"{path}: no such file")
    entry = read_manifest(path.parent).get(path.name)
    if entry is None:
        return _verify_alone(path, deep)
    # With an entry, the sha256 is the stronger check: the bytes are those read back at the save.
    size = path.stat().st_size
    if size != entry["size"]:
        return Verification("corrupt", f"{path.name} is {size} bytes, the manifest records {entry['size']} "
                                       "(truncated or overwritten)")
    if file_sha256(path) != entry["sha256"]:
        return Verification("corrupt", f"{path.name}: sha256 differs from the manifest (the file changed "
                                       "after it was written: disk error or tampering)")
    return Verification("ok")


def _verify_alone(path: Path, deep: bool) -> Verification:
    v = self_check(path)
    if v.status == "corrupt":
        return v
    where = f"{path.name} has no entry in {manifest_path(path.parent)}"
    if not deep:
        return Verification(v.status, f"{where}; {v.detail}")
    try:
        load_checkpoint(path)
    except UserError as e:
        return Verification("corrupt", str(e))
    checked = f"{v.detail} and " if v.ok else ""
    return Verification("ok", f"{where}, but {checked}it loads completely")


def require_intact(path: str | Path, what: str, fix: str) -> None:
    """UserError if `path` is corrupt (a missing file is left to load_checkpoint's "Checkpoint not
    found" message, which the seed guide documents)."""
    v = verify_checkpoint(path)
    if v.status == "corrupt":
        raise UserError(f"{path}: {what} is {v.status} ({v.detail}); {fix}")


def warn(message: str) -> None:
    print(f"lmpipe: warning: {message}", file=sys.stderr, flush=True)


def load_checkpoint(path: str | Path, map_location: str = "cpu", mmap: bool = False,
                    trust_pickle: bool = False) -> dict[str, Any]:
    """Load with weights_only=True; a missing, unreadable or incomplete file is a UserError.
    mmap=True maps tensors from the file instead of reading them (metadata-only uses)."""
    from lmpipe.safeload import Unreadable, torch_load

    path = Path(path)
    refuse_manifest(path)
    if not path.is_file():
        raise UserError(f"Checkpoint not found: {path}; check the path, list checkpoints with "
                        f"'lmpipe ckpt list {path.parent}' (or 'ls {path.parent}/'), "
                        "and train with ENABLE_CHECKPOINTS=true")
    try:
        ckpt = torch_load(path, trust_pickle, mmap, map_location)
    except Unreadable as e:
        raise UserError(f"{e}: the checkpoint is corrupted (an interrupted save, a full disk or a bad copy); "
                        f"use one from an earlier step ('lmpipe ckpt doctor {path}' names it)") from None
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        from lmpipe.formats import foreign_hint

        raise UserError(f"{path}: Checkpoint does not contain model_state_dict; {foreign_hint(ckpt, path)}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path}: checkpoint is missing {', '.join(missing)}; it was not written by lmpipe "
                        f"or is from an incompatible version ('lmpipe ckpt doctor {path}' explains what to do)")
    ckpt["model_state_dict"] = strip_prefixes(ckpt["model_state_dict"])
    return ckpt


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


def resolve_step(directory: str | Path, step: int) -> Path:
    """The checkpoint at `step`, or the nearest earlier one that verifies (and say so)."""
    found = [p for p in list_checkpoints(directory) if (parse_filename(p) or {}).get("step", -1) <= step]
    found.sort(key=lambda p: parse_filename(p)["step"])  # stable: newest last among equal steps
    if not found:
        steps = sorted({parse_filename(p)["step"] for p in list_checkpoints(directory) if parse_filename(p)})
        raise UserError(f"Checkpoint not found: no checkpoint at or before step {step} in {directory}/; "
                        f"available steps: {', '.join(map(str, steps)) or 'none'}")
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
            raise UserError(f"Checkpoint not found: nothing matches {spec!r}; list checkpoints with 'ls {directory}/'")
        path = Path(matches[-1])
    refuse_manifest(path)
    return path


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
                        f"{[len(g['params']) for g in then]}, the model has {[len(g['params']) for g in now]}; {fix}")
    params = [p for g in now for p in g["params"]]
    for idx, st in saved.get("state", {}).items():
        for key, value in st.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            if value.shape != params[idx].shape:
                raise UserError(f"{path}: optimizer {key} of parameter {idx} has shape {tuple(value.shape)}, "
                                f"the parameter has {tuple(params[idx].shape)}; {fix}")
            if not torch.isfinite(value).all():
                raise UserError(f"{path}: optimizer {key} of parameter {idx} contains NaN or Inf; {fix}")


def model_from_checkpoint(ckpt: dict[str, Any], device: str = "cpu"):
    """Rebuild the model from the checkpoint's own hyperparameters and load its weights."""
    from models import build_model

    model_cfg = {**ckpt["hyperparameters"]["model"], "vocab_size": ckpt["vocab_size"],
                 "block_size": ckpt["block_size"]}
    model = build_model(model_cfg)
    expected = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
                  for k, v in ckpt["model_state_dict"].items() if k in expected and v.shape != expected[k].shape]
    missing = sorted(set(expected) - set(ckpt["model_state_dict"]))
    if mismatched or missing:
        raise UserError(f"checkpoint weights do not fit a {model_cfg['type']} model built from its own "
                        f"hyperparameters ({'; '.join(mismatched[:5]) or 'missing ' + ', '.join(missing[:5])}); "
                        "the file was edited or written by another program")
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
