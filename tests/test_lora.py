"""LoRA through peft, in process: a tiny trained gpt base, adapters fine-tuned on it, checkpoints
that hold the adapters only plus the base's identity, rebuild/merge/resume, and the refusals."""
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from lmpipe.ckpt.lora import base_for_training
from lmpipe.ckpt.payload import build_payload, weights_sha256
from lmpipe.ckpt.rebuild import model_from_checkpoint
from lmpipe.ckpt.store import load_checkpoint, save_checkpoint
from lmpipe.common.errors import UserError
from lmpipe.config import load_config
from lmpipe.tokenizer import CharTokenizer
from lmpipe.train.loop import Callbacks, TrainState, make_optimizer, train
from lmpipe.train.run import fresh_setup
from lmpipe.train.saver import model_weights
from models import lora

CHARS = "abcdefghijk"
DATA = torch.tensor([(i * 7 + i // 13) % 11 for i in range(800)])
MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=16", "model.block_size=8"]


def _cfg(steps=12, **extra):
    over = [f"train.steps={steps}", "train.warmup_steps=2", "train.batch_size=4",
            "train.log_interval=1", "train.eval_interval=6", "train.eval_batches=2",
            "train.lr=0.01", "train.device=cpu", *MODEL,
            *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(None, over, env={})


def _payload(cfg, model, opt, state, tok):
    weights, base = model_weights(model)
    return build_payload(weights=weights, optimizer=opt.state_dict(),
                         hyperparameters=cfg.to_dict(), tokenizer_json=tok.to_json(),
                         step=state.step, vocab_size=tok.vocab_size, block_size=8, source="x",
                         run_id="r", train_state=state.to_dict(), metrics=state.metrics(),
                         base_model=base)


def _base(path, seed=0, steps=6):
    """A trained tiny lmpipe gpt checkpoint at `path`."""
    cfg = _cfg(steps, **{"train.seed": seed})
    torch.manual_seed(seed)
    from models import build_model
    model = build_model({"type": "gpt", "vocab_size": 11, "n_layer": 2, "n_head": 2,
                         "n_embd": 16, "block_size": 8})
    opt = make_optimizer(model, cfg.train)
    state = train(model, opt, DATA, DATA, cfg.train, 8, "cpu")
    save_checkpoint(path, _payload(cfg, model, opt, state, CharTokenizer(list(CHARS))))
    return path


def _lora_cfg(base, steps=12, **extra):
    return _cfg(steps, **{"model.pretrained": str(base), "model.lora.r": 4,
                          "model.lora.alpha": 8, **extra})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base path, LoRA checkpoint path, the LoRA model after training)."""
    d = tmp_path_factory.mktemp("lora")
    base = _base(d / "base.pt")
    s = fresh_setup(_lora_cfg(base), "cpu")
    state = train(s.model, s.optimizer, DATA, DATA, s.cfg.train, 8, "cpu", state=s.state)
    save_checkpoint(d / "lora.pt", _payload(s.cfg, s.model, s.optimizer, state, s.tok))
    return base, d / "lora.pt", s.model


X = torch.tensor([[(i * 3) % 11 for i in range(8)]])


def _logits(model):
    with torch.no_grad():
        return model.eval()(X)[0]


def test_only_adapters_train_and_the_base_is_unchanged(trained):
    base, _, model = trained
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    base_ckpt = load_checkpoint(base)
    inner = lora.base_model(model).state_dict()
    for k, v in base_ckpt["model_state_dict"].items():
        key = k.replace("attn.c_attn.", "attn.c_attn.base_layer.")
        assert torch.equal(inner[key], v), k
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_checkpoint_holds_adapters_and_base_identity(trained):
    base, path, model = trained
    ckpt = load_checkpoint(path)
    assert ckpt["model_state_dict"] and all("lora_" in k for k in ckpt["model_state_dict"])
    assert len(ckpt["model_state_dict"]) == 4  # lora_A, lora_B on c_attn of 2 layers
    b = ckpt["base_model"]
    assert b["name"] == str(base.resolve()) and b["type"] == "gpt"
    assert b["sha256"] == weights_sha256(model_from_checkpoint(load_checkpoint(base)).state_dict())
    for key in ("optimizer_state_dict", "hyperparameters", "vocab_size", "block_size",
                "batch_size", "step"):
        assert key in ckpt
    assert torch.equal(_logits(model_from_checkpoint(ckpt)), _logits(model))


def test_merge_equals_adapter_outputs(trained, tmp_path):
    from lmpipe.ckpt.convert import export_merged

    _, path, model = trained
    out = export_merged(path, tmp_path / "merged.pt")
    merged = load_checkpoint(out)
    assert "base_model" not in merged and not any("lora" in k for k in merged["model_state_dict"])
    assert merged["hyperparameters"]["model"]["lora_r"] == 0
    assert torch.allclose(_logits(model_from_checkpoint(merged)), _logits(model), atol=1e-5)
    with pytest.raises(UserError, match="not a LoRA checkpoint"):
        export_merged(out, tmp_path / "again.pt")


def test_a_different_or_missing_base_is_refused_in_one_line(trained, tmp_path):
    base, path, _ = trained
    ckpt = load_checkpoint(path)
    other = _base(tmp_path / "other.pt", seed=1)
    moved = replace_base(ckpt, name=str(other))
    with pytest.raises(UserError) as e:
        model_from_checkpoint(moved)
    msg = str(e.value)
    assert "\n" not in msg and str(other) in msg and ckpt["base_model"]["sha256"][:12] in msg
    assert weights_sha256(model_from_checkpoint(load_checkpoint(other)).state_dict())[:12] in msg
    with pytest.raises(UserError, match="missing") as e:
        model_from_checkpoint(replace_base(ckpt, name=str(tmp_path / "gone.pt")))
    assert "\n" not in str(e.value)


def replace_base(ckpt, **kw):
    return {**ckpt, "base_model": {**ckpt["base_model"], **kw}}


def test_targets_matching_nothing_name_the_modules_that_exist(trained):
    base = trained[0]
    with pytest.raises(UserError) as e:
        fresh_setup(_lora_cfg(base, **{"model.lora.target_modules": "q_proj"}), "cpu")
    assert "q_proj" in str(e.value) and "c_attn, c_fc, c_proj, lm_head" in str(e.value)
    with pytest.raises(UserError, match="model.pretrained"):
        fresh_setup(_lora_cfg(base.parent / "nope.pt"), "cpu")


def test_lora_resume_is_bit_exact(trained, tmp_path):
    base = trained[0]
    cfg = _lora_cfg(base, steps=12, **{"model.lora.dropout": 0.1})
    ref = fresh_setup(cfg, "cpu")
    full = train(ref.model, ref.optimizer, DATA, DATA, ref.cfg.train, 8, "cpu", state=ref.state)

    half = fresh_setup(cfg, "cpu")
    state = half.state
    state = train(half.model, half.optimizer, DATA, DATA, half.cfg.train, 8, "cpu",
                  Callbacks(should_stop=lambda: state.step >= 6), state)
    save_checkpoint(tmp_path / "c.pt", _payload(half.cfg, half.model, half.optimizer, state,
                                                half.tok))
    torch.manual_seed(999), random.seed(999), np.random.seed(999)
    ckpt = load_checkpoint(tmp_path / "c.pt")
    model = model_from_checkpoint(ckpt).train()
    opt = make_optimizer(model, half.cfg.train)
    opt.load_state_dict(ckpt["optimizer_state_dict"])
    resumed = train(model, opt, DATA, DATA, half.cfg.train, 8, "cpu",
                    state=TrainState.from_dict(ckpt["train_state"]))
    losses = [h["train_loss"] for h in state.history + resumed.history if "train_loss" in h]
    assert losses == [h["train_loss"] for h in full.history if "train_loss" in h]
    for (k, a), b in zip(ref.model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_inspect_and_verify_a_lora_checkpoint(trained, tmp_path, capsys):
    from lmpipe.ckpt.inspection import describe
    from lmpipe.ckpt.verify import check
    from lmpipe.ckpt.views import open_view

    base, path, _ = trained
    d = describe(open_view(path))
    assert d["lora"]["r"] == 4 and d["lora"]["base"] == str(base.resolve())
    assert check(path).ok, check(path).problems
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, replace_base(load_checkpoint(path), name=str(tmp_path / "gone.pt")))
    r = check(bad)
    assert r.kinds() == {"base"} and "missing" in r.problems[0].text
    with pytest.raises(UserError, match="missing"):
        describe(open_view(bad))


def test_base_for_training_keeps_the_base_architecture(trained):
    cfg, _, tok, ident = base_for_training(replace(_lora_cfg(trained[0]), model=replace(
        _lora_cfg(trained[0]).model, n_layer=7)), lambda: None)
    assert cfg.model.n_layer == 2 and cfg.model.lora_r == 4 and tok.vocab_size == 11
    assert ident["architecture"]["n_layer"] == 2
