"""The tracking buffer: MLflow writes that outlast an outage of the tracking server.

Each write (a batch of step metrics, a checkpoint as a logged model, artifacts, the end of a run:
lmpipe.tracking.writes) is first recorded in a journal on disk, BUFFER_DIR: one JSON file per
operation, named so that they sort in the order they were made, plus the files it uploads (hard
links, or copies: a checkpoint that retention deletes meanwhile is still sent). Then it is sent,
and its record is removed only once the server has taken it. Sending one again does no harm
(lmpipe.tracking.writes says why for each kind), so a write whose answer was lost is not a
duplicate.
A record is sent by one thread of one process at a time (an flock on it); another skips it.

While the server does not answer, training does not wait on it: a request gets one try of at most
TIMEOUT_S seconds (MLflow's default: 7 retries with backoff, ~4 minutes, 120 s each). A server that
refuses connections (stopped) is asked again at each write: that costs a millisecond. One that let
a request time out (hung, or a host that drops packets) is not asked again for RETRY_EVERY_S: the
writes meanwhile only go to the journal. So a hung server costs training at most TIMEOUT_S per
RETRY_EVERY_S (the checkpoint writer's thread may spend as much beside it, and a save waits for
it), and the end of a run 2 * TIMEOUT_S. The next lmpipe command that writes to MLflow, and
`lmpipe tracking flush`, send what is left.
"""
from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from lmpipe.common.errors import UserError, joined, warn
from lmpipe.common.fileio import atomic_write_text

BUFFER_DIR = Path(".lmpipe/tracking-buffer")
FAILED = "failed"  # records the server refused (4xx), kept with the reason beside them
TIMEOUT_S = 5
RETRY_EVERY_S = 30

Sender = Callable[[dict, list[Path]], Any]  # (record, its files) → what the caller gets back


class TrackingUnreachable(UserError):
    """The tracking server does not answer."""

    exit_code = 1


@dataclass
class Outcome:
    """What one pass over the journal did."""
    sent: int = 0
    unreachable: str | None = None  # why the server did not answer, if it did not
    values: dict[str, Any] = field(default_factory=dict)  # record name → what its sender returned


# --- the journal ---------------------------------------------------------------------------------

_seq = itertools.count()


def record(kind: str, uri: str, run_id: str, files: list[Path] = (), **fields) -> Path:
    """Write one operation to the journal, its files first; return the record's path."""
    name = f"{time.time_ns():019d}-{kind}-{run_id}-{os.getpid()}-{next(_seq)}"
    path = BUFFER_DIR / f"{name}.json"
    kept = []
    for i, f in enumerate(files):
        kept.append(f"{i}/{Path(f).name}")
        _keep(Path(f), _files_dir(path) / kept[-1])
    body = {"kind": kind, "uri": uri, "run_id": run_id, "files": kept, **fields}
    atomic_write_text(path, json.dumps(body, default=str))
    return path


def pending(run_id: str | None = None, kinds: tuple[str, ...] | None = None) -> list[Path]:
    """The journal's records, oldest first; of one run and some kinds if asked."""
    if not BUFFER_DIR.is_dir():
        return []
    out = []
    for path in sorted(BUFFER_DIR.glob("[0-9]*.json")):
        _, kind, rest = path.stem.split("-", 2)
        if (kinds is None or kind in kinds) and (run_id is None or rest.startswith(f"{run_id}-")):
            out.append(path)
    return out


def refused() -> list[Path]:
    return sorted((BUFFER_DIR / FAILED).glob("*.json"))


def uris() -> list[str]:
    """The tracking URIs the journal holds records for, in the order of their oldest record."""
    seen: dict[str, None] = {}
    for path in pending():
        try:
            seen[json.loads(path.read_text(encoding="utf-8"))["uri"]] = None
        except (OSError, ValueError):  # sent (and removed) meanwhile
            pass
    return list(seen)


def _files_dir(path: Path) -> Path:
    return path.with_suffix(".files")


def _keep(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        # no copy, and the data outlives the original's deletion; lmpipe replaces its files by
        # rename (atomic_path), never in place, so the link keeps what was logged
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(src, dst)


@contextmanager
def _claimed(path: Path) -> Iterator[dict | None]:
    """The record, held by this thread alone while the block runs; None if another thread or
    process holds it or has sent it."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        yield None
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield json.load(f) if os.fstat(f.fileno()).st_nlink else None


def _sweep(age_s: float = 3600) -> None:
    """Files of records that were never written (a process killed in record(), log_text)."""
    for d in list(BUFFER_DIR.glob("*.files")) + list(BUFFER_DIR.glob(".text-*")):
        if not d.with_suffix(".json").exists() and time.time() - d.stat().st_mtime > age_s:
            shutil.rmtree(d, ignore_errors=True)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    shutil.rmtree(_files_dir(path), ignore_errors=True)


def _refuse(path: Path, error: BaseException) -> None:
    """Move a record the server refused out of the way, with the reason beside it."""
    where = BUFFER_DIR / FAILED
    where.mkdir(parents=True, exist_ok=True)
    atomic_write_text(where / f"{path.stem}.error", f"{type(error).__name__}: {error}\n")
    if _files_dir(path).exists():
        os.replace(_files_dir(path), where / _files_dir(path).name)
    os.replace(path, where / path.name)
    warn(f"the MLflow tracking server refused a buffered write ({_reason(error)}); it is kept in "
         f"{where / path.name}")


# --- sending -------------------------------------------------------------------------------------

_down: dict[str, tuple[float, bool]] = {}  # URI → when a request last failed, whether it timed out


def retry(uri: str, senders: dict[str, Sender], run_id: str | None = None,
          kinds: tuple[str, ...] | None = None) -> Outcome:
    """Send the journal's records for `uri` (of one run and some kinds, if asked), oldest first,
    each removed once sent; stop at the first that gets no answer. Within RETRY_EVERY_S of a
    request that timed out, try nothing."""
    out = Outcome()
    was_down = uri in _down
    failed, timed_out = _down.get(uri, (0.0, False))
    if not timed_out or time.monotonic() - failed >= RETRY_EVERY_S:
        with quick():
            for path in pending(run_id, kinds):
                if not _send(path, uri, senders, out):
                    break
    if was_down and out.unreachable is None and out.sent:
        _down.pop(uri, None)
        print(f"lmpipe: the MLflow tracking server at {uri} answers again; sent {out.sent} "
              "buffered writes", file=sys.stderr, flush=True)
    return out


def _send(path: Path, uri: str, senders: dict[str, Sender], out: Outcome) -> bool:
    """One record: sent and removed, refused (moved to FAILED), or kept. False: no answer."""
    with _claimed(path) as op:
        if op is None or op["uri"] != uri:
            return True
        try:
            value = senders[op["kind"]](op, [_files_dir(path) / f for f in op["files"]])
        except Exception as e:  # noqa: BLE001 - sorted into no answer, a server error, refused
            if _no_answer(e) or _server_error(e):
                if uri not in _down:
                    warn(f"the MLflow tracking server at {uri} does not answer ({_reason(e)}); "
                         f"MLflow writes are kept in {BUFFER_DIR} until it does")
                _failed(uri, e)
                out.unreachable = _reason(e)
                return not _no_answer(e)  # a 5xx on one record: the next may go through
            _refuse(path, e)
            return True
        _remove(path)
    out.sent += 1
    out.values[path.name] = value
    return True


def submit(kind: str, uri: str, run_id: str, senders: dict[str, Sender], files: list[Path] = (),
           **fields) -> tuple[bool, Any]:
    """Record one operation and send it (with the run's older records of that kind): whether it
    went, and what its sender returned."""
    path = record(kind, uri, run_id, files, **fields)
    out = retry(uri, senders, run_id, (kind,))
    return path.name in out.values, out.values.get(path.name)


def _failed(uri: str, e: BaseException) -> None:
    _down[uri] = (time.monotonic(), _timed_out(e))


def _no_answer(e: BaseException | None) -> bool:
    """No HTTP answer: refused, reset or timed out (MLflow wraps requests' error in its own)."""
    import requests

    while e is not None:
        if isinstance(e, (requests.RequestException, ConnectionError, TimeoutError)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _timed_out(e: BaseException | None) -> bool:
    import requests

    while e is not None:
        if isinstance(e, (requests.Timeout, TimeoutError)) or "timed out" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def _server_error(e: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(e, MlflowException) and e.get_http_status_code() >= 500


def _reason(e: BaseException) -> str:
    text = str(e)
    if m := re.search(r"\[Errno -?\d+\] ([^'\")]+)", text):
        return m.group(1).strip()
    if _timed_out(e):
        return f"no answer within {TIMEOUT_S} s"
    return text.splitlines()[0][:200] if text else type(e).__name__


# --- flushing, and a run's end -------------------------------------------------------------------

def flush_pending(uri: str, senders: dict[str, Sender]) -> None:
    """Before a command writes to MLflow: send what earlier ones left for `uri`, if it answers."""
    if not pending() or unanswered(uri):
        return
    _down.pop(uri, None)  # it answers now
    if (out := retry(uri, senders)).sent:
        print(f"lmpipe: sent {out.sent} MLflow writes buffered earlier to {uri}", file=sys.stderr,
              flush=True)


def flush_all(senders: dict[str, Sender]) -> str:
    """`lmpipe tracking flush`: every record to its own server; one line saying what was sent.
    TrackingUnreachable (exit 1) if a server does not answer: its records stay."""
    _sweep()
    targets, sent, down = uris(), 0, []
    for uri in targets:
        if reason := unanswered(uri):
            out = Outcome(unreachable=reason)
        else:
            _down.pop(uri, None)
            out = retry(uri, senders)
        sent += out.sent
        if out.unreachable:
            down.append(f"{uri} ({out.unreachable})")
    left, bad = len(pending()), len(refused())
    note = f"; {bad} writes the server refused are in {BUFFER_DIR / FAILED}" if bad else ""
    if down:
        raise TrackingUnreachable(
            f"the MLflow tracking server at {joined(down)} does not answer: {left} buffered writes "
            f"stay in {BUFFER_DIR} ({sent} sent){note}; run 'lmpipe tracking flush' again once it "
            "is up")
    if not targets:
        return f"nothing to send: {BUFFER_DIR} holds no buffered MLflow writes{note}"
    return (f"sent {sent} buffered MLflow writes to {', '.join(targets)}; {left} left in "
            f"{BUFFER_DIR}{note}")


@contextmanager
def outlasting(active_run, uri: str, senders: dict[str, Sender]) -> Iterator[Any]:
    """mlflow.start_run's run, ended (FINISHED, or FAILED on an exception) whether or not the
    server answers then."""
    status = "FAILED"
    try:
        yield active_run
        status = "FINISHED"
    finally:
        end_run(uri, active_run.info.run_id, status, senders)


def end_run(uri: str, run_id: str, status: str, senders: dict[str, Sender]) -> None:
    """End the active run: its records sent first; its end recorded if the server does not take
    it."""
    import mlflow

    retry(uri, senders, run_id)
    end_time = int(time.time() * 1000)
    try:
        with quick():
            mlflow.end_run(status)  # leaves the active run first, then tells the server
        return
    except Exception as e:
        if not (_no_answer(e) or _server_error(e)):
            raise
        _failed(uri, e)
    record("end", uri, run_id, status=status, end_time=end_time)
    warn(f"MLflow run {run_id}: {len(pending(run_id))} writes wait in {BUFFER_DIR} for the "
         f"tracking server at {uri}; the next lmpipe command that uses MLflow sends them, or "
         "'lmpipe tracking flush'")


def log_text(uri: str, run_id: str, text: str, artifact_file: str,
             senders: dict[str, Sender]) -> None:
    """mlflow.log_text, through the journal."""
    folder, _, name = artifact_file.rpartition("/")
    tmp = BUFFER_DIR / f".text-{os.getpid()}-{next(_seq)}"
    tmp.mkdir(parents=True)
    try:
        (tmp / name).write_text(text, encoding="utf-8")
        submit("artifacts", uri, run_id, senders, files=[tmp / name], artifact_paths=[folder])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- short requests and the server's health ------------------------------------------------------

_QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(TIMEOUT_S)}
_quick_lock = threading.Lock()
_quick_state: dict[str, Any] = {"users": 0, "saved": {}}


@contextmanager
def quick() -> Iterator[None]:
    """MLflow's HTTP requests get one try and TIMEOUT_S seconds while any thread is inside (MLflow
    reads these variables at each request); the user's settings come back after."""
    with _quick_lock:
        if _quick_state["users"] == 0:
            _quick_state["saved"] = {k: os.environ.get(k) for k in _QUICK}
            os.environ.update(_QUICK)
        _quick_state["users"] += 1
    try:
        yield
    finally:
        with _quick_lock:
            _quick_state["users"] -= 1
            if _quick_state["users"] == 0:
                for k, v in _quick_state["saved"].items():
                    os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def unanswered(uri: str) -> str | None:
    """Why a tracking server does not answer its /health within TIMEOUT_S; None if it does (any
    HTTP answer counts, an auth proxy's 401 too) or if `uri` is not a server."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=TIMEOUT_S).close()
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}" if e.code >= 500 else None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return "timed out" if isinstance(reason, TimeoutError) else str(
            getattr(reason, "strerror", None) or reason)
    return None


def require_reachable(uri: str) -> None:
    if reason := unanswered(uri):
        raise TrackingUnreachable(
            f"the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) does not answer "
            f"({reason}); start it ('make mlflow-server'), or unset MLFLOW_TRACKING_URI to use "
            "the local store in ./mlruns")
