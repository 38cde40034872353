"""The manifest: each checkpoint directory's .manifest.json records every checkpoint's sha256, size,
step, metrics and run id. A save records its entry before the rename that commits the file, so
every file under a checkpoint's name has one (ckpt/store.py); a file without an entry (a copy, a
download) checks itself instead (ckpt/selfcheck.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmpipe.common.errors import warn
from lmpipe.common.fileio import atomic_write_text

# Hidden, so that the seed guide's `ls checkpoints/ | sort | tail -1` gives a checkpoint.
MANIFEST = ".manifest.json"
OLD_MANIFEST = "manifest.json"  # earlier versions' name: still read, replaced at the next write
MANIFEST_FORMAT = "lmpipe-checkpoint-manifest"


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
        warn(f"{path}: unreadable manifest; checkpoints in {directory} will be verified by loading "
             "them")
        return {}


def recorded_sha256(path: str | Path) -> str:
    """The sha256 the manifest records for the checkpoint `path` (taken from the bytes read back
    at its save), or, for a file without an entry, the file's own."""
    from lmpipe.common.fileio import file_sha256

    entry = read_manifest(Path(path).parent).get(Path(path).name) or {}
    return entry.get("sha256") or file_sha256(path)


def update_manifest(directory: Path, change) -> None:
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


