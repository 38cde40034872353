"""Small file helpers: atomic writes (temp name in the same directory, fsync, os.replace) and
hashes."""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | Path, before_commit: Callable[[Path, str | None], None] | None = None,
                sha256: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write by name; rename it over `path` only if the
    block succeeds.

    A crash at any point leaves either the old file or the new one under `path`, never a partial
    one. `before_commit(tmp, digest)` runs after the data is fsynced and before the rename (e.g. to
    record it in a manifest); if it raises, nothing is renamed. With sha256=True, digest is the
    sha256 of the file as read back from the page cache while fsync writes it to disk (both run at
    once).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    hasher = _TailHasher(tmp) if sha256 else None
    try:
        yield tmp
        if hasher:
            hasher.finish()  # the hasher reads what is left while fsync runs below
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # meanwhile the hasher reads the file's tail from the page cache
        finally:
            os.close(fd)
        if before_commit is not None:
            before_commit(tmp, hasher.hexdigest() if hasher else None)
        os.replace(tmp, path)
    except BaseException:
        if hasher:
            hasher.stop()
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class _TailHasher(threading.Thread):
    """sha256 of a file that is being written append-only (torch's zip writer), computed a step
    behind the writer on another core. finish() says the writer is done; hexdigest() waits."""

    CHUNK = 16 << 20

    def __init__(self, path: Path):
        super().__init__(name="lmpipe-sha256", daemon=True)
        self.path, self.sha = path, hashlib.sha256()
        self._writer_done, self._stopped = threading.Event(), threading.Event()
        self.start()

    def run(self) -> None:
        buf = bytearray(self.CHUNK)
        view = memoryview(buf)
        with open(self.path, "rb", buffering=0) as f:
            while not self._stopped.is_set():
                done = self._writer_done.is_set()  # read before reading: the data then is complete
                n = f.readinto(buf)
                if n:
                    self.sha.update(view[:n])
                elif done:
                    return
                else:
                    time.sleep(0.002)

    def finish(self) -> None:
        self._writer_done.set()

    def stop(self) -> None:
        self._stopped.set()
        self.join()

    def hexdigest(self) -> str:
        self.join()
        return self.sha.hexdigest()


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """atomic_path for writers that take a file object."""
    with atomic_path(path) as tmp, open(tmp, mode,
                                        **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f


def write_error(path: Path, error: BaseException) -> BaseException:
    """The OSError behind a failed write that a library reported without its errno (torch.save
    says only 'unexpected pos'): probe with one more byte at the end of the file."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        return e
    try:
        os.pwrite(fd, b"\0", os.fstat(fd).st_size)
    except OSError as e:  # EFBIG (file-size limit), ENOSPC (disk full), EIO...
        return e
    finally:
        os.close(fd)
    return error


class SaveAbandoned(Exception):
    """A save cancelled on request (a second Ctrl+C)."""


def stale_temporaries(directory: str | Path) -> list[Path]:
    """Temporaries that atomic_path left behind when a process died mid-write."""
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


def fsync_path(path: str | Path) -> None:
    """fsync a file's data, or a directory's entries (renames in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_path


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
