"""`make mlflow-server`: an MLflow tracking server for several users or machines, on 127.0.0.1.
Runs and models go to a database, artifacts to a local folder the server serves
(mlflow-artifacts:/, so clients need no access to its disk). DB=sqlite: one file under the server
folder, nothing to install. DB=postgres: a PostgreSQL server of its own, started from the binaries
on PATH (initdb once into <dir>/postgres, then pg_ctl start on 127.0.0.1 and a free port) and
stopped after MLflow. Ctrl-C (or SIGTERM) stops everything it started.

    python scripts/mlflow_server.py [--db sqlite|postgres] [--dir mlflow-server]
                                    [--host 127.0.0.1] [--port 5000] [--pg-port 5432]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# scripts/serve.py: stop a process group (SIGTERM, then SIGKILL); wait for GET /health
from serve import stop_group, wait_healthy

READY = "mlflow-server: serving"  # printed once MLflow answers (tests wait for it)
PG_BINARIES = ("initdb", "pg_ctl", "postgres")
PG_USER = "mlflow"  # the database superuser initdb creates; the database is called mlflow too
INSTALL = ("install them (apt-get install postgresql, then add /usr/lib/postgresql/<N>/bin to "
           "PATH; or brew install postgresql@15 and add its bin) or use DB=sqlite")


class Refusal(Exception):
    """Bad input or a missing prerequisite, found before anything is written: one line, exit 2."""


class Stop(Exception):
    """Ctrl-C (SIGINT) or SIGTERM: one path stops everything."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    server_dir = Path(args.dir).resolve()
    try:
        pg = Postgres(server_dir / "postgres", _pg_binaries(), _pg_os_user()) \
            if args.db == "postgres" else None
        if pg:
            pg.preflight()
        _check_port(args.host, args.port)
        pg_port = pick_pg_port(args.pg_port) if pg else None
    except Refusal as e:
        print(f"mlflow-server: error: {e}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)
    mlflow = None
    try:
        (server_dir / "artifacts").mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        store = pg.start(pg_port) if pg else f"sqlite:///{server_dir}/mlflow.db"
        pg_s = time.monotonic() - started
        mlflow = start_mlflow(args, store, server_dir, pg)
        wait_healthy(_url(args.host, args.port), mlflow, args.timeout, "mlflow server")
        print(banner(args, store, mlflow, pg, pg_s, time.monotonic() - started - pg_s), flush=True)
        mlflow.wait()
        print(f"mlflow-server: error: mlflow server exited (code {mlflow.returncode}); its "
              "output is above", file=sys.stderr)
        return 1
    except Stop:
        print("mlflow-server: stopping", file=sys.stderr, flush=True)
        return 0
    except RuntimeError as e:
        print(f"mlflow-server: error: {e}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the cleanup
            signal.signal(sig, signal.SIG_IGN)
        if mlflow is not None:
            # MLflow first (it must not lose its database mid-request); its worker stops at once,
            # its CLI process can linger seconds after that, and is then killed
            stop_group(mlflow, grace=3)
        if pg is not None:
            pg.stop()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--dir", default="mlflow-server",
                   help="the server's folder: database, artifacts (default: mlflow-server)")
    p.add_argument("--host", default="127.0.0.1", help="where MLflow listens")
    p.add_argument("--port", type=int, default=5000, help="MLflow's port")
    p.add_argument("--pg-port", type=int, default=5432,
                   help="PostgreSQL's port on 127.0.0.1; another free one if it is in use")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for MLflow")
    return p


def _raise_stop(signum, frame) -> None:
    raise Stop()


# --- prerequisites and ports ---------------------------------------------------------------------

def _pg_binaries() -> dict[str, str]:
    """initdb, pg_ctl and postgres from PATH, and psycopg2 in this Python (MLflow's driver)."""
    found = {name: shutil.which(name) for name in PG_BINARIES}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise Refusal(f"DB=postgres needs the PostgreSQL server binaries {', '.join(PG_BINARIES)} "
                      f"on PATH (missing: {', '.join(missing)}); {INSTALL}")
    if importlib.util.find_spec("psycopg2") is None:
        raise Refusal(f"DB=postgres needs psycopg2 in {sys.executable}: pip install -c "
                      "constraints.txt -e '.[postgres]' (make setup installs it)")
    return found


def _pg_os_user() -> pwd.struct_passwd | None:
    """The user PostgreSQL runs as: this one, or `postgres` when this is root (it refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise Refusal("PostgreSQL refuses to run as root and there is no user 'postgres' to run "
                      "it as; run this as an ordinary user (or: useradd postgres)") from None


def _in_use(host: str, port: int) -> bool:
    """Whether binding host:port fails (as the server's own bind would)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _check_port(host: str, port: int) -> None:
    if _in_use(host, port):
        raise Refusal(f"port {port} on {host} is in use; pick another with "
                      "'make mlflow-server PORT=N' (or --port N)")


def pick_pg_port(wanted: int) -> int:
    """`wanted` if it is free on 127.0.0.1, else one the OS picks, said in one line."""
    if not _in_use("127.0.0.1", wanted):
        return wanted
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"mlflow-server: PostgreSQL port {wanted} on 127.0.0.1 is in use; using {port} instead "
          "(choose one with PGPORT=N)", flush=True)
    return port


# --- PostgreSQL ----------------------------------------------------------------------------------

class Postgres:
    """A PostgreSQL cluster in `data` (made once, reused), run with pg_ctl as `os_user` (None:
    this user). Password auth on 127.0.0.1 only, no Unix socket; the password is in <dir>/pgpass,
    which libpq reads through PGPASSFILE, so it never appears in a URI or a process list."""

    def __init__(self, data: Path, binaries: dict[str, str], os_user: pwd.struct_passwd | None):
        self.data, self.bin, self.os_user = data, binaries, os_user
        self.pgpass = data.parent / "pgpass"
        self.log = data.parent / "postgres.log"

    def _run(self, name: str, *args: str, **kw) -> subprocess.CompletedProcess:
        """One PostgreSQL binary, in the server folder."""
        return self._run_as([self.bin[name], *args], cwd=self.data.parent, **kw)

    def _run_as(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        """A command as the user that owns the cluster; its output captured."""
        as_user = {} if self.os_user is None else {
            "user": self.os_user.pw_uid, "group": self.os_user.pw_gid, "extra_groups": []}
        return subprocess.run(cmd, text=True, capture_output=True, **as_user, **kw)

    def _give(self, path: Path) -> None:
        if self.os_user is not None:
            os.chown(path, self.os_user.pw_uid, self.os_user.pw_gid)

    def preflight(self) -> None:
        """Refuse a folder the cluster's user cannot reach, a cluster that another server (a
        killed earlier run's) still serves, a folder in the way, and a lost password file."""
        if self.os_user is not None and not self._reachable():
            raise Refusal(f"PostgreSQL runs as user {self.os_user.pw_name} here (it refuses "
                          f"root), and that user cannot reach {self.data.parent}: let it in "
                          "(chmod o+x on the folders above) or choose another --dir")
        if (self.data / "PG_VERSION").exists() and self._run("pg_ctl", "status", "-D",
                                                             str(self.data)).returncode == 0:
            raise Refusal(f"a PostgreSQL server already runs on {self.data} (an earlier "
                          f"mlflow-server killed?); stop it with: pg_ctl -D {self.data} stop -m "
                          "fast" + (f" (as user {self.os_user.pw_name})" if self.os_user else ""))
        if self.data.exists() and not (self.data / "PG_VERSION").exists():
            raise Refusal(f"{self.data} exists but is not a PostgreSQL data directory; move it "
                          "away or choose another --dir")
        if self.data.exists() and not self.pgpass.exists():
            raise Refusal(f"{self.pgpass} (the database password) is missing; move {self.data} "
                          "away to make a new cluster (its runs are not in the new one)")

    def _reachable(self) -> bool:
        """Whether the cluster's user can enter the server folder (or the folder that will hold
        it: root makes the rest with mode 755)."""
        here = self.data.parent
        while not here.exists():
            here = here.parent
        return self._run_as(["test", "-x", str(here)], cwd="/").returncode == 0

    def init(self) -> None:
        """initdb + the mlflow database, into a scratch folder renamed into place at the end, so
        an interrupted first start leaves no half-made cluster."""
        scratch = self.data.parent / "postgres.new"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            self._give(scratch)
            password = secrets.token_urlsafe(24)
            pwfile = scratch / "pwfile"
            _write_private(pwfile, password + "\n")
            self._give(pwfile)
            self._check("initdb", "-D", str(scratch / "data"), "-U", PG_USER, "--pwfile",
                        str(pwfile), "--auth=scram-sha-256", "-E", "UTF8", "--locale=C",
                        "--no-instructions")
            self._check("postgres", "--single", "-D", str(scratch / "data"), "postgres",
                        input=f"CREATE DATABASE {PG_USER};\n")
            _write_private(self.pgpass, f"127.0.0.1:*:*:{PG_USER}:{password}\n")
            (scratch / "data").rename(self.data)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _check(self, name: str, *args: str, **kw) -> None:
        done = self._run(name, *args, **kw)
        if done.returncode != 0 or "ERROR:" in done.stdout + done.stderr:
            raise RuntimeError(f"{name} failed (exit code {done.returncode}):\n"
                               f"{(done.stdout + done.stderr)[-2000:]}")

    def start(self, port: int) -> str:
        """Make the cluster if needed, start it on 127.0.0.1:port; MLflow's backend store URI."""
        if not self.data.exists():
            print(f"mlflow-server: creating the PostgreSQL cluster in {self.data}", flush=True)
            self.init()
        self.log.touch()
        self._give(self.log)
        # -k '': no Unix socket (its path would be limited to ~100 characters); TCP only
        done = self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l",
                         str(self.log), "-o", f"-p {port} -h 127.0.0.1 -k ''")
        if done.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start on 127.0.0.1:{port}; the end of "
                               f"{self.log}:\n{self.log.read_text(errors='replace')[-1500:]}")
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{port}/{PG_USER}"

    def pid(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        return int(pidfile.read_text().split()[0]) if pidfile.exists() else None

    def stop(self) -> None:
        """pg_ctl stop -m fast: open sessions are ended, the data is flushed. No-op if stopped."""
        if self.pid() is not None:
            self._run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(self.data))


def _write_private(path: Path, text: str) -> None:
    """A file only its owner reads (libpq ignores a password file others can read)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("")
    tmp.chmod(0o600)
    tmp.write_text(text)
    tmp.rename(path)


# --- MLflow --------------------------------------------------------------------------------------

def _mlflow() -> str:
    """The mlflow beside this Python (the project's venv), else the one on PATH."""
    here = Path(sys.executable).parent / "mlflow"
    return str(here) if here.exists() else (shutil.which("mlflow") or "mlflow")


def start_mlflow(args: argparse.Namespace, store: str, server_dir: Path,
                 pg: Postgres | None) -> subprocess.Popen:
    """`mlflow server` in a process group of its own (Ctrl-C reaches this script only). One
    worker, as SQLite takes one writer; no job runner (MLflow's GenAI jobs, unused by lmpipe)."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if pg is not None:
        env["PGPASSFILE"] = str(pg.pgpass)
    cmd = [_mlflow(), "server", "--backend-store-uri", store, "--serve-artifacts",
           "--artifacts-destination", str(server_dir / "artifacts"), "--host", args.host,
           "--port", str(args.port), "--workers", "1"]
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def _url(host: str, port: int) -> str:
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


def banner(args: argparse.Namespace, store: str, mlflow: subprocess.Popen, pg: Postgres | None,
           pg_s: float, mlflow_s: float) -> str:
    url = _url(args.host, args.port)
    pids = f"mlflow pid {mlflow.pid}" + (f", postgres pid {pg.pid()}" if pg else "")
    lines = [f"{READY} {url} ({pids}); Ctrl-C stops it",
             f"  store:     {store}" + (f" (password in {pg.pgpass})" if pg else ""),
             f"  artifacts: {Path(args.dir).resolve() / 'artifacts'} (as mlflow-artifacts:/)",
             f"  started:   PostgreSQL in {pg_s:.1f} s, MLflow in {mlflow_s:.1f} s" if pg else
             f"  started:   MLflow in {mlflow_s:.1f} s",
             f"  point lmpipe at it: export MLFLOW_TRACKING_URI={url}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
