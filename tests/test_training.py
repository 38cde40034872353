import math

import pytest
import torch

from lmpipe.config import load_config
from lmpipe.training import Callbacks, lr_at, make_optimizer, train
from models import build_model


def _cfg(*extra):
    return load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.lr=0.01", "train.min_lr=0.001",
                              "train.batch_size=8", "train.eval_interval=50", "train.eval_batches=2", *extra],
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
                  Callbacks(should_save=lambda s: s % 40 == 0, on_save=lambda s, st: saved.append(s)))
    return model, state, saved


def test_training_learns_and_is_deterministic():
    cfg = _cfg()
    m1, s1, saved = _run(cfg)
    m2, _, _ = _run(cfg)
    losses = [h["train_loss"] for h in s1.history if "train_loss" in h]
    assert losses[-1] < losses[0] * 0.5
    assert saved == [40, 80, 100]  # every interval, and always the final step
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert s1.best_val_loss <= s1.last_val_loss


def test_bigram_with_its_by_model_defaults_beats_the_uniform_guess(project):
    """The repo's by_model.bigram defaults (the tiny project copies them): a short CPU run on the
    tiny corpus ends well below ln(vocab), the loss of guessing every character uniformly."""
    from lmpipe import data
    from lmpipe.tokenizer import CharTokenizer
    from lmpipe.training import TrainState, estimate_loss

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
