import pytest
import torch

from lmpipe.config import MODEL_TYPES
from lmpipe.generate import sample
from models import MODELS, build_model

TINY = {"vocab_size": 11, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 8, "dropout": 0.1,
        "bias": True}
# gpt2 is rebuilt from its stored GPT2Config (no hub): the same tiny shape
HF_CONFIG = {"gpt2": {"hf_config": {"vocab_size": 11, "n_positions": 8, "n_layer": 2, "n_head": 2,
                                    "n_embd": 8}}}


def test_config_accepts_exactly_the_registered_models():
    assert MODEL_TYPES == tuple(MODELS)


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_model_builds_and_has_the_right_shapes(kind):
    torch.manual_seed(0)
    model = build_model({"type": kind, **TINY, **HF_CONFIG.get(kind, {})})
    idx = torch.randint(0, 11, (3, 8))  # (B, T)
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 8, 11)
    assert loss.ndim == 0 and torch.isfinite(loss)
    out = sample(model.eval(), idx[:, :2], 10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 12) and int(out.max()) < 11


@pytest.mark.parametrize("kind", ["gpt", "nanochat"])
def test_transformers_are_causal(kind):
    torch.manual_seed(0)
    model = build_model({"type": kind, **TINY, "dropout": 0.0}).eval()
    for p in model.parameters():  # nanochat zero-inits its head and residual projections
        torch.nn.init.normal_(p, std=0.5)
    a = torch.randint(0, 11, (1, 8))
    b = a.clone()
    b[0, 5:] = (b[0, 5:] + 1) % 11  # change only the future
    la, _ = model(a)
    lb, _ = model(b)
    assert torch.allclose(la[0, :5], lb[0, :5]) and not torch.allclose(la[0, 5:], lb[0, 5:])


@pytest.mark.parametrize("kind", ["gpt", "nanochat"])
def test_transformers_reject_sequences_longer_than_block_size(kind):
    model = build_model({"type": kind, **TINY})
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_unknown_model_key():
    with pytest.raises(ValueError, match="must be one of bigram, gpt, nanochat"):
        build_model({"type": "rnn", **TINY})


def test_nanochat_grouped_key_value_heads_and_rotary_positions():
    torch.manual_seed(0)
    model = build_model({"type": "nanochat", **TINY, "n_head": 4, "n_kv_head": 2}).eval()
    assert model.transformer.h[0].attn.c_k.weight.shape == (4, 8)  # 2 kv heads × head_dim 2
    # rotary tables are rebuilt, never saved (as in nanochat)
    assert "cos" not in model.state_dict()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    idx = torch.tensor([[1, 2, 3, 1, 2, 3]])
    logits, _ = model(idx)
    # same token, other position: rotary sees it
    assert not torch.allclose(logits[0, 0], logits[0, 3])
    assert logits.abs().max() <= 15.0  # soft-capped
