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
                before_commit: Callable[[Path, str | None], None] | None = None,
                sha256: bool = False) -> Iterator[IO]:
    """Write to a temporary sibling and rename it over `path` only if the block succeeds.

    A crash at any point leaves either the old file or the new one under `path`, never a partial one.
    `before_commit(tmp, digest)` runs after the data is fsynced and before the rename (e.g. to record
    it in a manifest); if it raises, nothing is renamed. With sha256=True, digest is the sha256 of
    the file as read back from the page cache while fsync writes it to disk (both run at once).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        # Binary: unbuffered, so large writes (tensor storages) go straight to the kernel.
        with os.fdopen(fd, mode, **({"buffering": 0} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            digest = _fsync_and_hash(f.fileno(), tmp) if sha256 else os.fsync(f.fileno())
        if before_commit is not None:
            before_commit(Path(tmp), digest)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _fsync_and_hash(fd: int, path: str) -> str:
    """fsync on a helper thread while this one hashes the file (both release the GIL)."""
    import threading

    errors: list[BaseException] = []

    def sync() -> None:
        try:
            os.fsync(fd)
        except BaseException as e:  # re-raised below, in the caller's thread
            errors.append(e)

    t = threading.Thread(target=sync, name="lmpipe-fsync")
    t.start()
    try:
        digest = file_sha256(path)
    finally:
        t.join()
    if errors:
        raise errors[0]
    return digest


class SaveAbandoned(Exception):
    """A write cancelled through CheckedWriter's abort event."""


class CheckedWriter:
    """A write-through file wrapper for torch.save: counts bytes, stops at once when `abort` (a
    threading.Event) is set, and keeps the real error, which torch.save reports as RuntimeError."""

    def __init__(self, f: IO[bytes], abort=None):
        self.f, self.size, self.abort = f, 0, abort
        self.error: BaseException | None = None

    def write(self, b) -> int:
        if self.abort is not None and self.abort.is_set():
            self.error = SaveAbandoned()
            raise self.error
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = e
            raise
        self.size += len(b)
        return n

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
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_md5(path: str | Path) -> str:
    """The hash DVC 3 records for a file output in dvc.lock."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
