#!/usr/bin/env python3
"""The project's DVC remote: configure one, check that it is reachable, push and pull through it.

    python scripts/dvc_remote.py add URL [--name NAME]   # make dvc-remote [DVC_REMOTE=URL]
    python scripts/dvc_remote.py push [-r NAME]          # make dvc-push
    python scripts/dvc_remote.py pull [-r NAME]          # make dvc-pull

A directory is this machine's remote, so `add` writes it to .dvc/config.local (git-ignored); a URL
(s3://, gs://, ssh://...) is the team's, so it goes to .dvc/config, to be committed, and credentials
go to config.local (`dvc remote modify --local`). An unreachable remote is one line on stderr and
exit 2, before DVC runs: nothing is configured, pushed or pulled. Run it with the project's venv
Python: it runs that venv's `dvc`, whose storage plugins are that interpreter's packages.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

DVC = str(Path(sys.executable).parent / "dvc")

# URL scheme → (the module of DVC's plugin for it, the pip extra that installs the plugin)
PLUGINS = {
    "s3": ("dvc_s3", "dvc[s3]"),
    "gs": ("dvc_gs", "dvc[gs]"),
    "gcs": ("dvc_gs", "dvc[gs]"),
    "ssh": ("dvc_ssh", "dvc[ssh]"),
    "azure": ("dvc_azure", "dvc[azure]"),
    "gdrive": ("dvc_gdrive", "dvc[gdrive]"),
    "webdav": ("dvc_webdav", "dvc[webdav]"),
    "webdavs": ("dvc_webdav", "dvc[webdav]"),
}
# Schemes whose URL names the server to connect to, with its default port. (s3:// and gs:// name a
# bucket: their server is the cloud's, or the remote's endpointurl setting.)
PORTS = {"ssh": 22, "http": 80, "https": 443, "webdav": 80, "webdavs": 443}


class RemoteError(Exception):
    """A problem with the remote, said in one line."""


class Remote(NamedTuple):
    name: str
    url: str
    path: Path | None  # the directory, for a local remote
    endpoint: str | None = None  # endpointurl: an S3-compatible server's (MinIO, Ceph...)


def local_path(url: str, config_file: str = "") -> Path | None:
    """The directory a remote URL names (relative to its config file, as DVC reads it), or None for
    a URL on another machine or service."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if len(parsed.scheme) > 1:  # one letter: a Windows drive
        return None
    path = Path(url).expanduser()
    return path if path.is_absolute() else Path(config_file).parent / path


def write_problem(path: Path) -> str | None:
    """Why DVC could not create `path` or write into it, or None."""
    if path.exists():
        if not path.is_dir():
            return f"{path} is not a directory"
        return None if os.access(path, os.W_OK | os.X_OK) else f"no write permission on {path}"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, so the directory {path} cannot be created"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"no write permission on {parent} to create {path}"
    return None


def read_problem(path: Path) -> str | None:
    """Why DVC could not read pushed data from `path`, or None."""
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist (nothing pushed there)"
        return f"{path} {what}"
    return None if os.access(path, os.R_OK | os.X_OK) else f"no read permission on {path}"


def plugin_problem(url: str) -> str | None:
    """The missing plugin a remote URL needs, with the command that installs it, or None."""
    module, extra = PLUGINS.get(urlparse(url).scheme, (None, None))
    if module is None or importlib.util.find_spec(module):
        return None
    return (f"DVC's {urlparse(url).scheme} plugin ({module}) is not installed; "
            f"install it: {sys.executable} -m pip install \"{extra}\"")


def connect_problem(remote: Remote) -> str | None:
    """Why the remote's server does not accept a connection, or None (also when the URL names no
    server, or ~/.ssh/config may route ssh elsewhere: DVC then reports it itself). DVC reports a
    refused connection only as "N files failed to upload", so it is probed here first."""
    url = urlparse(remote.endpoint or remote.url)
    if url.scheme not in PORTS or not url.hostname:
        return None
    if url.scheme == "ssh" and (Path.home() / ".ssh" / "config").exists():
        return None
    port = url.port or PORTS[url.scheme]
    try:
        socket.create_connection((url.hostname, port), timeout=10).close()
    except OSError as e:
        return (f"cannot connect to {url.hostname}:{port} ({e.strerror or e}); check that the "
                "server is up and the URL is right")
    return None


def unreachable(remote: Remote, pulling: bool) -> str | None:
    """One line saying why `remote` cannot be used, or None when it can be tried."""
    if remote.path is None:  # a service: credentials and buckets are DVC's to report
        why = plugin_problem(remote.url) or connect_problem(remote)
        return why and f"DVC remote '{remote.name}' ({remote.url}) is not reachable: {why}"
    why = read_problem(remote.path) if pulling else write_problem(remote.path)
    if why is None:
        return None
    todo = ("push to it first (make dvc-push), or point at the right one: make dvc-remote "
            "DVC_REMOTE=DIR" if pulling else "choose a directory you can write: make dvc-remote "
            "DVC_REMOTE=DIR")
    return f"DVC remote '{remote.name}' ({remote.url}) is not reachable: {why}; {todo}"


def dvc(*args: str) -> subprocess.CompletedProcess:
    """Run this venv's dvc, its output captured."""
    return subprocess.run([DVC, *args], capture_output=True, text=True)


def dvc_error(result: subprocess.CompletedProcess) -> str:
    """DVC's own error message on one line, without its prefixes (it may list targets below its
    ERROR line, up to a blank line)."""
    lines = result.stderr.strip().splitlines() or ["no message"]
    starts = [i for i, line in enumerate(lines) if line.startswith("ERROR:")]
    msg = []
    for line in lines[starts[-1]:] if starts else lines[-1:]:
        if not line.strip() or line.startswith("Having any troubles"):
            break
        msg += [] if line.startswith("<http") else [line.strip()]
    return " ".join(msg).removeprefix("ERROR:").strip().removeprefix("unexpected error - ")


def configured(name: str | None) -> Remote:
    """The remote called `name` (default: DVC's default remote), from every level of DVC's config:
    `dvc config --list --show-origin` prints `FILE<TAB>remote.NAME.url=URL` and `core.remote=NAME`.
    """
    result = dvc("config", "--list", "--show-origin")
    if result.returncode:
        raise RemoteError(f"cannot read DVC's config here: {dvc_error(result)}; run this from the "
                          "project's root (a DVC repository)")
    settings, origins = {}, {}  # remote.NAME.KEY=VALUE; where each remote's url is set
    for line in result.stdout.splitlines():
        origin, _, setting = line.partition("\t")
        key, _, value = setting.partition("=")
        settings[key] = value
        if key.startswith("remote.") and key.endswith(".url"):
            origins[key[len("remote."):-len(".url")]] = origin
    name = name or settings.get("core.remote")
    if name is None:
        raise RemoteError("no default DVC remote is configured; run 'make dvc-remote' (a directory "
                          "on this machine) or 'dvc remote add -d NAME URL'")
    if name not in origins:
        raise RemoteError(f"no DVC remote named '{name}' (configured: "
                          f"{', '.join(origins) or 'none'}); add it with 'make dvc-remote' or "
                          "'dvc remote add NAME URL'")
    url, endpoint = settings[f"remote.{name}.url"], settings.get(f"remote.{name}.endpointurl")
    return Remote(name, url, local_path(url, origins[name]), endpoint)


def add(url: str, name: str | None) -> None:
    """Make `url` the default remote: a directory in .dvc/config.local, a URL in .dvc/config."""
    path = local_path(url)
    if path is not None:
        path = path.resolve()  # config.local must not depend on where make ran
    remote = Remote(name or ("local" if path else urlparse(url).scheme), str(path or url), path)
    problem = unreachable(remote, pulling=False)
    if problem:
        raise RemoteError(problem)
    level = "--local" if path else "--project"
    result = dvc("remote", "add", level, "--default", "--force", remote.name, remote.url)
    if result.returncode:
        raise RemoteError(f"cannot add DVC remote '{remote.name}' ({remote.url}): "
                          f"{dvc_error(result)}")
    if path:
        path.mkdir(parents=True, exist_ok=True)
        print(f"DVC remote '{remote.name}' ({remote.url}) is the default on this machine "
              "(.dvc/config.local); next: make dvc-push")
    else:  # a default left in config.local would still win over the project's
        dvc("remote", "default", "--local", "--unset")
        print(f"DVC remote '{remote.name}' ({remote.url}) is the project's default (.dvc/config: "
              f"commit it); credentials: dvc remote modify --local {remote.name} ...")


def sync(verb: str, name: str | None) -> None:
    """`dvc push` or `dvc pull` through the remote, once it is known to be reachable."""
    remote = configured(name)
    problem = unreachable(remote, pulling=verb == "pull")
    if problem:
        raise RemoteError(problem)
    print(f"dvc {verb} -r {remote.name}  ({remote.url})", flush=True)
    result = subprocess.run([DVC, verb, "-r", remote.name], stderr=subprocess.PIPE, text=True)
    if result.returncode:
        raise RemoteError(f"dvc {verb} with DVC remote '{remote.name}' ({remote.url}) failed: "
                          f"{dvc_error(result)}; rerun 'dvc {verb} -r {remote.name} -v' for why")
    sys.stderr.write(result.stderr)  # DVC's warnings, if any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_add = sub.add_parser("add", help="make URL (a directory, s3://, gs://, ssh://) the default")
    p_add.add_argument("url")
    p_add.add_argument("--name", help="the remote's name (default: local, or the URL's scheme)")
    for verb in ("push", "pull"):
        sub.add_parser(verb, help=f"dvc {verb}, after checking the remote").add_argument(
            "-r", "--remote", help="a configured remote (default: DVC's default remote)")
    args = parser.parse_args(argv)
    try:
        add(args.url, args.name) if args.command == "add" else sync(args.command, args.remote)
    except RemoteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # DVC, interrupted too, has said what it left
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
