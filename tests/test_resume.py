"""Checkpoints you can trust, in process: bit-exact resume through a real checkpoint file, the
schedule after a resume, asynchronous snapshots, retention, verification and optimizer checks."""
import copy
import math
import random

import numpy as np
import pytest
import torch

from lmpipe.ckpt.integrity import verify_checkpoint
from lmpipe.ckpt.locate import resolve_checkpoint
from lmpipe.ckpt.manifest import read_manifest
from lmpipe.ckpt.payload import build_payload
from lmpipe.ckpt.rebuild import check_optimizer_state, model_from_checkpoint
from lmpipe.ckpt.store import load_checkpoint, save_checkpoint
from lmpipe.common.errors import UserError
from lmpipe.config import load_config
from lmpipe.train.loop import Callbacks, TrainState, make_optimizer, train
from lmpipe.train.saver import Checkpointer
from lmpipe.train.schedule import Schedule
from models import build_model

DATA = torch.tensor([(i * 7 + i // 13) % 11 for i in range(800)])


def _cfg(steps=24, **extra):
    over = [f"train.steps={steps}", "train.warmup_steps=4", "train.batch_size=4",
            "train.log_interval=1",
            "train.eval_interval=8", "train.eval_batches=2", "train.lr=0.01",
            *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(None, over, env={})


ARCH = {"vocab_size": 11, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16, "dropout": 0.2}


def _model(kind):
    torch.manual_seed(0)
    return build_model({"type": kind, **ARCH})


def _losses(state):
    return [h["train_loss"] for h in state.history if "train_loss" in h]


def _payload(model, opt, state, cfg):
    kind = "gpt" if hasattr(model, "transformer") else "bigram"
    hp = cfg.to_dict()
    hp["model"].update({k: v for k, v in ARCH.items() if k != "vocab_size"}, type=kind)
    return build_payload(weights=model.state_dict(), optimizer=opt.state_dict(), hyperparameters=hp,
                         tokenizer_json="{}", step=state.step, vocab_size=11, block_size=8,
                         source="x",
                         run_id="r", train_state=state.to_dict(), metrics=state.metrics(),
                         batch_size=4)


@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_resume_through_a_checkpoint_file_is_bit_exact(kind, tmp_path):
    cfg = _cfg()
    straight = _model(kind)
    opt = make_optimizer(straight, cfg.train)
    ref = train(straight, opt, DATA, DATA, cfg.train, 8, "cpu")

    half = _model(kind)
    opt_h = make_optimizer(half, cfg.train)
    state = TrainState.fresh(cfg.train)
    # the signal path: stop after step 12 of the 24-step plan, then save
    state = train(half, opt_h, DATA, DATA, cfg.train, 8, "cpu",
                  Callbacks(should_stop=lambda: state.step >= 12), state)
    assert state.step == 12
    save_checkpoint(tmp_path / "c.pt", _payload(half, opt_h, state, cfg))

    torch.manual_seed(999), random.seed(999), np.random.seed(999)  # a new process' RNGs
    ckpt = load_checkpoint(tmp_path / "c.pt")
    model = model_from_checkpoint(ckpt).train()
    opt2 = make_optimizer(model, cfg.train)
    opt2.load_state_dict(ckpt["optimizer_state_dict"])
    resumed = train(model, opt2, DATA, DATA, cfg.train, 8, "cpu",
                    state=TrainState.from_dict(ckpt["train_state"]))

    assert _losses(state) + _losses(resumed) == _losses(ref)  # identical per-step losses
    for (k, a), b in zip(straight.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for sa, sb in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values(),
                      strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lr_after_resume_equals_uninterrupted_and_extensions_are_continuous():
    s = Schedule.fresh(100, 10, 1e-3, 1e-4)
    back = Schedule.from_dict(s.to_dict())
    assert all(back.lr_at(k) == s.lr_at(k) for k in range(100))
    # --steps 200: continue from the current LR, decay to the floor at 260
    more = s.extended(60, 200)
    assert more.lr_at(60) == pytest.approx(s.lr_at(60)) and more.lr_at(260) == pytest.approx(1e-4)
    assert all(more.lr_at(k + 1) <= more.lr_at(k) for k in range(60, 260))
    restart = s.extended(60, 40, lr=5e-4)  # --lr: restart from that peak
    assert restart.lr_at(60) == pytest.approx(5e-4)
    warm = s.extended(60, 40, warmup=10)  # --no-optimizer --warmup 10
    assert warm.lr_at(60) == pytest.approx(s.lr_at(60)
                                           / 10) and warm.lr_at(69) == pytest.approx(s.lr_at(60))


def test_async_save_is_isolated_from_later_weight_changes(tmp_path):
    cfg = _cfg()
    model = _model("gpt")
    opt = make_optimizer(model, cfg.train)
    state = TrainState.fresh(cfg.train)
    ck = Checkpointer(tmp_path, cfg.checkpoint, "r")
    assert ck.cfg.async_save
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    ck.save(tmp_path / "checkpoint_gpt_x_step0001_01012026_000000.pt",
            _payload(model, opt, state, cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # right after save() returns
    ck.wait()
    saved = load_checkpoint(ck.saved[0])["model_state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in expected.items())
    assert verify_checkpoint(ck.saved[0]).ok


def test_retention_keeps_last_best_milestones_and_protected(tmp_path):
    cfg = _cfg(**{"checkpoint.keep_last": 2, "checkpoint.keep_best": 1, "checkpoint.keep_every": 40,
                  "checkpoint.async": "false"})
    model = _model("bigram")
    opt = make_optimizer(model, cfg.train)
    other = Checkpointer(tmp_path, cfg.checkpoint, "another-run")
    other.save(tmp_path / "checkpoint_bigram_x_step0005_01012026_000000.pt",
               {**_payload(model, opt, TrainState.fresh(cfg.train), cfg), "run_id": "another-run"})
    protected = tmp_path / "checkpoint_bigram_x_step0010_01012026_000000.pt"
    ck = Checkpointer(tmp_path, cfg.checkpoint, "r", protect=(protected,))
    val = {10: 3.0, 20: 1.0, 30: 2.5, 40: 2.9, 50: 2.8, 60: 2.7, 70: 2.6}
    for step, loss in val.items():
        state = TrainState.fresh(cfg.train)
        state.step, state.last_val_loss = step, loss
        ck.save(tmp_path / f"checkpoint_bigram_x_step{step:04d}_01012026_000000.pt",
                _payload(model, opt, state, cfg))
    left = sorted(int(p.name.split("_step")[1][:4]) for p in tmp_path.glob("*.pt"))
    # protected 10, best 20, milestone 40, last two 60 and 70; the other run's step 5 is untouched
    assert left == [5, 10, 20, 40, 60, 70]
    assert set(read_manifest(tmp_path)) == {p.name for p in tmp_path.glob("*.pt")}


def test_keep_best_ranks_only_val_losses_measured_at_the_checkpoint_step(tmp_path):
    """A save on a signal carries the last evaluation's loss (val_step earlier than its step): it
    must not be kept as "best" for weights that were never evaluated."""
    cfg = _cfg(**{"checkpoint.keep_last": 1, "checkpoint.keep_best": 1,
                  "checkpoint.async": "false"})
    model = _model("bigram")
    opt = make_optimizer(model, cfg.train)
    ck = Checkpointer(tmp_path, cfg.checkpoint, "r")
    for step, loss, val_step in [(10, 2.0, 10), (25, 1.0, 20), (30, 3.0, 30), (40, 2.5, 40)]:
        state = TrainState.fresh(cfg.train)
        state.step, state.last_val_loss, state.last_val_step = step, loss, val_step
        ck.save(tmp_path / f"checkpoint_bigram_x_step{step:04d}_01012026_000000.pt",
                _payload(model, opt, state, cfg))
    left = sorted(int(p.name.split("_step")[1][:4]) for p in tmp_path.glob("*.pt"))
    assert left == [10, 40]  # the best measured (10) and the last; not the stale 1.0 at step 25


def test_val_step_travels_with_the_training_state_and_older_states_load():
    from lmpipe.tracking.runs import logged_metrics

    state = TrainState.fresh(_cfg().train)
    state.step, state.last_val_loss, state.last_val_step = 25, 1.0, 20
    assert TrainState.from_dict(state.to_dict()).last_val_step == 20
    older = {k: v for k, v in state.to_dict().items() if k != "last_val_step"}
    assert TrainState.from_dict(older).last_val_step is None
    # MLflow's logged model for a checkpoint gets the training estimate (val_loss_est) only when
    # it is that step's own
    assert logged_metrics({"step": 25, "metrics": state.metrics()}) == {}
    assert logged_metrics({"step": 20, "metrics": state.metrics()}) == {"val_loss_est": 1.0}
    assert logged_metrics({"step": 25, "metrics": {"val_loss": 1.0}}) == {"val_loss_est": 1.0}
    assert logged_metrics({"step": 5, "metrics": {"val_loss": None, "val_step": None}}) == {}


def test_corrupt_newest_is_reported_skipped_and_kept(tmp_path, capsys):
    cfg = _cfg(**{"checkpoint.async": "false"})
    model = _model("bigram")
    opt = make_optimizer(model, cfg.train)
    ck = Checkpointer(tmp_path, cfg.checkpoint, "r")
    paths = []
    for step in (1, 2, 3):
        state = TrainState.fresh(cfg.train)
        state.step = step
        paths.append(tmp_path / f"checkpoint_bigram_x_step{step:04d}_01012026_00000{step}.pt")
        ck.save(paths[-1], _payload(model, opt, state, cfg))
    raw = bytearray(paths[2].read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit
    paths[2].write_bytes(raw)
    paths[1].write_bytes(paths[1].read_bytes()[:-100])  # truncated
    assert verify_checkpoint(paths[2]).status == "corrupt"
    assert "truncated" in verify_checkpoint(paths[1]).detail
    assert resolve_checkpoint("latest", tmp_path) == paths[0]
    err = capsys.readouterr().err
    assert "skipping corrupt checkpoint" in err and paths[2].name in err and "kept in place" in err
    assert paths[2].exists() and paths[1].exists()


def test_missing_step_resolves_to_nearest_earlier(tmp_path, capsys):
    cfg = _cfg(**{"checkpoint.async": "false"})
    model = _model("bigram")
    opt = make_optimizer(model, cfg.train)
    ck = Checkpointer(tmp_path, cfg.checkpoint, "r")
    for step in (100, 200):
        state = TrainState.fresh(cfg.train)
        state.step = step
        ck.save(tmp_path / f"checkpoint_bigram_x_step{step:04d}_01012026_000000.pt",
                _payload(model, opt, state, cfg))
    assert "step0100" in resolve_checkpoint("latest", tmp_path, step=150).name
    assert "no checkpoint at step 150; using step 100" in capsys.readouterr().err
    with pytest.raises(UserError, match="available steps: 100, 200"):
        resolve_checkpoint("latest", tmp_path, step=50)


def test_incompatible_or_broken_optimizer_state_is_refused(tmp_path):
    cfg = _cfg()
    model = _model("gpt")
    opt = make_optimizer(model, cfg.train)
    model(DATA[:8].view(1, 8), DATA[1:9].view(1, 8))[1].backward()
    opt.step()
    ckpt = {"optimizer_state_dict": opt.state_dict()}
    check_optimizer_state(ckpt, make_optimizer(model, cfg.train), "c.pt")  # compatible
    broken = copy.deepcopy(opt.state_dict())  # state_dict() shares the optimizer's own state dicts
    broken["state"][0]["exp_avg"] = torch.zeros(3, 3)
    with pytest.raises(UserError, match=r"has shape \(3, 3\).*--no-optimizer --warmup K"):
        check_optimizer_state({"optimizer_state_dict": broken}, make_optimizer(model, cfg.train),
                              "c.pt")
    nan = copy.deepcopy(opt.state_dict())
    nan["state"][1]["exp_avg_sq"] = nan["state"][1]["exp_avg_sq"].clone().fill_(math.nan)
    with pytest.raises(UserError, match="NaN or Inf"):
        check_optimizer_state({"optimizer_state_dict": nan}, make_optimizer(model, cfg.train),
                              "c.pt")
    with pytest.raises(UserError, match="no optimizer state"):
        check_optimizer_state({}, make_optimizer(model, cfg.train), "c.pt")


def test_stale_temporaries_are_cleaned_at_start(tmp_path, capsys):
    (tmp_path / ".checkpoint_gpt_x_step0010_01012026_000000.pt.abc123.tmp").write_bytes(b"partial")
    Checkpointer(tmp_path, _cfg().checkpoint, "r")
    assert not list(tmp_path.glob("*.tmp")) and "interrupted save" in capsys.readouterr().err
