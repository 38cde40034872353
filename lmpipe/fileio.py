"""Small file helpers: atomic writes (temp name in the same directory, fsync, os.replace) and hashes."""
from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb",
                before_commit: Callable[[Path], None] | None = None) -> Iterator[IO]:
    """Write to a temporary sibling and rename it over `path` only if the block succeeds.

    A crash at any point leaves either the old file or the new one under `path`, never a partial one.
    `before_commit(tmp)` runs after the data is fsynced and before the rename (e.g. to record it in a
    manifest); if it raises, nothing is renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_commit is not None:
            before_commit(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class SaveAbandoned(Exception):
    """A write cancelled through HashingWriter's abort event."""


class HashingWriter:
    """A write-only file wrapper that hashes (sha256) and counts what passes through it; setting
    `abort` makes the next write raise SaveAbandoned."""

    def __init__(self, f: IO[bytes], abort=None):
        self.f, self.sha256, self.size, self.abort = f, hashlib.sha256(), 0, abort
        self.error: BaseException | None = None  # torch.save reports a failed write as RuntimeError

    def write(self, b) -> int:
        if self.abort is not None and self.abort.is_set():
            self.error = SaveAbandoned()
            raise self.error
        self.sha256.update(b)
        self.size += len(b)
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def stale_temporaries(directory: str | Path) -> list[Path]:
    """Temporaries that atomic_open left behind when a process died mid-write."""
    directory = Path(directory)
    return sorted(directory.glob(f".*{TMP_SUFFIX}")) if directory.is_dir() else []


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, briefly, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_md5(path: str | Path) -> str:
    """The hash DVC 3 records for a file output in dvc.lock."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
