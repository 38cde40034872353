"""The manifest is hidden from `ls`, read under its old name and migrated, and refused with one
clear line wherever a checkpoint is expected."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from builders import save_lmpipe
from conftest import REPO, cli_env
from test_ckpt_tools import run
from test_cli import assert_user_error

from lmpipe.ckpt.integrity import verify_checkpoint
from lmpipe.ckpt.manifest import MANIFEST, OLD_MANIFEST, read_manifest
from lmpipe.ckpt.store import delete_checkpoint, list_checkpoints
from lmpipe.common.fileio import TMP_SUFFIX


@pytest.fixture
def ckdir(project):
    d = project / "checkpoints"
    for step in (500, 1000, 2000):
        save_lmpipe(d, step, source="dear_agnes", run_id="r1")
    return d


def newest(d):
    return list_checkpoints(d)[-1]


def test_ls_sort_tail_gives_the_newest_checkpoint(ckdir):
    """The seed guide's CHECKPOINT=$(ls checkpoints/ | sort | tail -1), in the inference form."""
    # a temporary of an interrupted save stays out of `ls` too
    fd, _ = tempfile.mkstemp(dir=ckdir, prefix=f".{newest(ckdir).name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    assert (ckdir / MANIFEST).exists()
    listed = subprocess.run(["ls", "checkpoints/"], capture_output=True, text=True).stdout.split()
    assert listed and all(n.startswith("checkpoint_") and n.endswith(".pt") for n in listed)
    script = ("CHECKPOINT=$(ls checkpoints/ | sort | tail -1); echo \"$CHECKPOINT\" >&2; "
              "CHECKPOINT_PATH=checkpoints/$CHECKPOINT MODE=inference MAX_NEW_TOKENS=5 PROMPT=Dear "
              f"{sys.executable} {REPO / 'scripts' / 'load_checkpoint.py'}")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=cli_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[0] == newest(ckdir).name and r.stdout.startswith("Dear")


@pytest.mark.parametrize("name", [MANIFEST, OLD_MANIFEST, "backup.json"])
def test_a_manifest_passed_as_a_checkpoint_says_what_to_pass(ckdir, capsys, name):
    """Either name, or any JSON file that is a manifest: one line, never 'corrupted'."""
    if name != MANIFEST:
        shutil.copy(ckdir / MANIFEST, ckdir / name)
        if name == OLD_MANIFEST:  # as an earlier version left the directory
            (ckdir / MANIFEST).unlink()
    path = f"checkpoints/{name}"
    said = (f"{path} is lmpipe's checkpoint manifest (the integrity record of the checkpoints in "
            "checkpoints/), not a checkpoint; pass one of them, "
            f"e.g. checkpoints/{newest(ckdir).name}, or ")
    for argv in (["generate", "--checkpoint", path], ["resume", "--checkpoint", path],
                 ["ckpt", "verify", path], ["ckpt", "doctor", path], ["ckpt", "inspect", path],
                 ["ckpt", "diff", path, str(newest(ckdir))], ["ckpt", "export", path],
                 ["ckpt", "import", path], ["ckpt", "list", path]):
        code, out, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("lmpipe: error: "), (argv, err)
        wanted = said if argv[1] != "list" else f"{path} is lmpipe's checkpoint manifest"
        assert wanted in err and not out, (argv, err)
        assert "corrupt" not in err and "retrain" not in err, argv
    assert "or the directory to diagnose all" in run(capsys, "ckpt", "doctor", path)[2]
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "load_checkpoint.py")],
                       env=cli_env(CHECKPOINT_PATH=path, MODE="resume"), capture_output=True,
                       text=True, timeout=300)
    assert_user_error(r, said + "'latest'")


def test_manifest_without_checkpoints_says_to_train(project, capsys):
    d = project / "checkpoints"
    delete_checkpoint(save_lmpipe(d, 10))  # leaves a manifest with no entries
    code, _, err = run(capsys, "generate", "--checkpoint", f"checkpoints/{MANIFEST}")
    assert code == 2 and "there are no checkpoints in checkpoints/ yet" in err


def test_an_earlier_versions_manifest_is_read_then_migrated(ckdir, capsys):
    (ckdir / MANIFEST).rename(ckdir / OLD_MANIFEST)
    first = list_checkpoints(ckdir)[0]
    v = verify_checkpoint(first)
    assert v.ok and v.detail == ""  # checked against the old manifest's sha256
    names = {p.name for p in list_checkpoints(ckdir)}
    assert set(read_manifest(ckdir)) == names
    rows = json.loads(run(capsys, "ckpt", "list", "--json")[1])
    assert [r["verified"] for r in rows] == ["ok"] * 3 and {r["run_id"] for r in rows} == {"r1"}
    save_lmpipe(ckdir, 3000, source="dear_agnes", run_id="r1")  # the next write migrates
    assert not (ckdir / OLD_MANIFEST).exists()
    entries = json.loads((ckdir / MANIFEST).read_text())["checkpoints"]
    assert len(entries) == 4 and verify_checkpoint(first).ok
