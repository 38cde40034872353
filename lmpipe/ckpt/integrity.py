"""Is a checkpoint file the bytes that were written? Size and sha256 against the manifest; a file
without an entry (a copy, a download) is checked against its own zip CRC-32s (ckpt/selfcheck.py).
"""
from __future__ import annotations

from pathlib import Path

from lmpipe.ckpt.manifest import manifest_path, read_manifest
from lmpipe.ckpt.selfcheck import Verification, self_check
from lmpipe.ckpt.store import load_checkpoint
from lmpipe.common.errors import UserError
from lmpipe.common.fileio import file_sha256


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
        return Verification("corrupt",
                            f"{path.name} is {size} bytes, the manifest records {entry['size']} "
                                       "(truncated or overwritten)")
    if file_sha256(path) != entry["sha256"]:
        return Verification("corrupt",
                            f"{path.name}: sha256 differs from the manifest (the file changed "
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


