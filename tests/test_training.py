import itertools
import math
import re

import pytest
import torch

from lmpipe.config import load_config
from lmpipe.train.loop import Callbacks, lr_at, make_optimizer, train
from models import build_model


def _cfg(*extra):
    return load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.lr=0.01",
                              "train.min_lr=0.001",
                              "train.batch_size=8", "train.eval_interval=50",
                              "train.eval_batches=2", *extra],
                       env={}).train


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = _cfg()
    assert math.isclose(lr_at(0, cfg), 0.001) and math.isclose(lr_at(9, cfg), 0.01)
    assert math.isclose(lr_at(10, cfg), 0.01)
    assert lr_at(50, cfg) < lr_at(20, cfg)
    assert math.isclose(lr_at(100, cfg), 0.001)


def _run(cfg, seed=0):
    torch.manual_seed(seed)
    data = torch.tensor([i % 7 for i in range(500)])  # a learnable cycle
    model = build_model({"type": "gpt", "vocab_size": 7, "n_layer": 1, "n_head": 2, "n_embd": 16,
                         "block_size": 8, "dropout": 0.1})
    opt = make_optimizer(model, cfg)
    saved = []
    state = train(model, opt, data, data, cfg, 8, "cpu",
                  Callbacks(should_save=lambda s: s % 40 == 0, on_save=lambda s,
                            st: saved.append(s)))
    return model, state, saved


def test_training_learns_and_is_deterministic():
    cfg = _cfg()
    m1, s1, saved = _run(cfg)
    m2, _, _ = _run(cfg)
    losses = [h["train_loss"] for h in s1.history if "train_loss" in h]
    assert losses[-1] < losses[0] * 0.5
    assert saved == [40, 80, 100]  # every interval, and always the final step
    assert all(torch.equal(a, b) for a,
               b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True))
    assert s1.best_val_loss <= s1.last_val_loss


def test_bigram_with_its_by_model_defaults_beats_the_uniform_guess(project):
    """The repo's by_model.bigram defaults (the tiny project copies them): a short CPU run on the
    tiny corpus ends well below ln(vocab), the loss of guessing every character uniformly."""
    from lmpipe import data
    from lmpipe.tokenizer import CharTokenizer
    from lmpipe.train.loop import TrainState, estimate_loss

    cfg = load_config("params.yaml", ["model.type=bigram"], env={})
    corpus = data.split_corpus(cfg.data.source, cfg.data.val_fraction, cfg.data.seed, 17)
    tok = CharTokenizer(corpus.text("train") + corpus.text("val"))
    train_ids, val_ids = (torch.tensor(tok.encode(corpus.text(s))) for s in ("train", "val"))
    torch.manual_seed(cfg.train.seed)
    model = build_model({"type": "bigram", "vocab_size": tok.vocab_size})
    block, uniform = cfg.model.block_size, math.log(tok.vocab_size)
    start = estimate_loss(model, val_ids, block, 4, 2, 0, "cpu")
    assert start == pytest.approx(uniform)  # zero init: exactly the uniform guess
    state = train(model, make_optimizer(model, cfg.train), train_ids, val_ids, cfg.train, block,
                  "cpu", state=TrainState.fresh(cfg.train))
    assert state.step == cfg.train.steps <= 50
    assert state.last_val_loss < uniform - 0.5, (state.last_val_loss, uniform)


def _bigram_run(cfg, clock, capsys):
    """A tiny bigram run with stderr captured (not a terminal): its progress lines and history."""
    torch.manual_seed(0)
    data = torch.tensor([i % 7 for i in range(500)])
    model = build_model({"type": "bigram", "vocab_size": 7})
    capsys.readouterr()
    state = train(model, make_optimizer(model, cfg), data, data, cfg, 8, "cpu", clock=clock)
    return [ln for ln in capsys.readouterr().err.splitlines() if "/60 | " in ln], state


PROGRESS = re.compile(r"step (\d+)/60 \| loss ([\d.]+)( \(running mean of (\d+) steps\))? \| "
                      r"lr [\d.e+-]+ \| ([\d,]+) tok/s \| eta (\d+)s")


def test_progress_line_every_log_interval_when_not_a_terminal(capsys):
    cfg = _cfg("train.steps=60", "train.log_interval=2", "train.eval_interval=1000")
    clock = itertools.count(0.0, 1.0).__next__  # each step takes 1 s: no heartbeat lines
    lines, state = _bigram_run(cfg, clock, capsys)
    parsed = [PROGRESS.fullmatch(ln) for ln in lines]
    assert all(parsed), lines
    assert [int(m[1]) for m in parsed] == list(range(2, 61, 2))  # from the first interval on
    logged = [h for h in state.history if "train_loss" in h]
    assert [float(m[2]) for m in parsed] == [round(h["train_loss"], 4) for h in logged]
    assert all(int(m[5].replace(",", "")) > 0 for m in parsed)
    assert [int(m[6]) for m in parsed] == [60 - s for s in range(2, 61, 2)]  # 1 s per step left


def test_progress_heartbeat_between_long_log_intervals(capsys):
    """log_interval beyond the run: a line still comes every 10 s, with the running mean loss."""
    _, every_step = _bigram_run(_cfg("train.steps=60", "train.log_interval=1"),
                                itertools.count().__next__, capsys)
    per_step = [h["train_loss"] for h in every_step.history if "train_loss" in h]
    cfg = _cfg("train.steps=60", "train.log_interval=1000", "train.eval_interval=1000")
    lines, _ = _bigram_run(cfg, itertools.count(0.0, 3.0).__next__, capsys)  # 3 s per step
    parsed = [PROGRESS.fullmatch(ln) for ln in lines]
    assert all(parsed), lines
    steps = [int(m[1]) for m in parsed]
    assert steps == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60]  # 12 s apart
    for m in parsed[:-1]:  # between log lines: the mean of every step since the run began
        n = int(m[4])
        assert n == int(m[1]) and float(m[2]) == pytest.approx(sum(per_step[:n]) / n, abs=1e-4)
    assert parsed[-1][3] is None  # the last step is a log line of its own


def test_dtype_auto_is_float32_on_cpu_and_an_unsupported_one_falls_back_in_one_line(capsys):
    from lmpipe.common.device import resolve_dtype

    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"  # CPU autocast supports bfloat16
    assert resolve_dtype("float16", "cpu") == "float32"
    assert capsys.readouterr().err == ("lmpipe: warning: train.dtype=float16 is not supported "
                                       "on cpu; training in float32\n")


def test_bfloat16_autocast_trains_on_cpu():
    torch.manual_seed(0)
    cfg = _cfg("train.steps=30")
    data = torch.tensor([i % 7 for i in range(500)])
    model = build_model({"type": "gpt", "vocab_size": 7, "n_layer": 1, "n_head": 2, "n_embd": 16,
                         "block_size": 8})
    state = train(model, make_optimizer(model, cfg), data, data, cfg, 8, "cpu", dtype="bfloat16")
    losses = [h["train_loss"] for h in state.history if "train_loss" in h]
    assert losses[-1] < losses[0] and all(p.dtype == torch.float32 for p in model.parameters())
