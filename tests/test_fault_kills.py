"""The random-kill fault test, in a file of its own so that `pytest -n 2 --dist loadfile` runs it
beside the other fault tests (tests/test_faults.py) instead of after them: it is the suite's
longest test."""
import random
import time

import pytest
from test_faults import (  # noqa: F401  (fault_project: a fixture)
    assert_clean,
    assert_same_training,
    cli,
    fault_project,
    final_checkpoint,
    start,
)

from lmpipe.ckpt.locate import latest_verified
from lmpipe.ckpt.manifest import read_manifest
from lmpipe.ckpt.store import list_checkpoints

pytestmark = pytest.mark.slow


def test_random_kills_including_during_saves_then_resume_equals_uninterrupted(fault_project,  # noqa: F811
                                                                               capsys):
    over = ["-S", "train.steps=200", "-S", "checkpoint.interval=3", "-S", "model.n_embd=128",
            # rotation runs under the kills
            "-S", "checkpoint.keep_last=2", "-S", "checkpoint.keep_best=0"]
    cli(capsys, "stage", "train", *over, "-S", "checkpoint.dir=ref")  # in-process, one thread
    ref = final_checkpoint(fault_project / "ref", 200)
    ckdir = fault_project / "run"
    over += ["-S", "checkpoint.dir=run"]
    rng = random.Random(1234)
    kills = during_save = resumes = 0

    def newest_step() -> int:
        return max((e["step"] for e in read_manifest(ckdir).values()), default=0)

    while True:
        have = bool(list_checkpoints(ckdir))
        resumes += have
        p = start(fault_project,
                  *(["resume", "--checkpoint", "latest"] if have else ["stage", "train"]), *over)
        if kills >= 20:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            break
        # Training is under way once this process commits its first checkpoint.
        first = newest_step()
        deadline = time.time() + 120
        while newest_step() == first and p.poll() is None and time.time() < deadline:
            time.sleep(0.001)
        if rng.random() < 0.5:  # strike while the next checkpoint is being written
            while (not list(ckdir.glob(".checkpoint_*.tmp")) and p.poll() is None
                   and time.time() < deadline):
                time.sleep(0.0002)  # a save takes milliseconds; a bare spin takes a core
        else:  # or at a random moment of training
            time.sleep(rng.uniform(0, 0.3))
        writing = bool(list(ckdir.glob(".checkpoint_*.tmp")))  # a save is in progress right now
        if p.poll() is None:
            p.kill()
            kills += 1
            during_save += writing
        p.communicate()
        if p.returncode == 0:
            break
        if have:  # a kill, even during rotation, never leaves zero valid checkpoints
            assert latest_verified(ckdir)
    assert kills >= 20 and during_save >= 3 and resumes >= 20, (kills, during_save, resumes)
    assert_same_training(ref, final_checkpoint(ckdir, 200))
    assert_clean(ckdir)
