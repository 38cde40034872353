import pytest
import torch

from lmpipe.config import MODEL_TYPES
from lmpipe.sampling import sample
from models import MODELS, build_model

TINY = {"vocab_size": 11, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 8, "dropout": 0.1, "bias": True}


def test_config_accepts_exactly_the_registered_models():
    assert MODEL_TYPES == tuple(MODELS)


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_model_builds_and_has_the_right_shapes(kind):
    torch.manual_seed(0)
    model = build_model({"type": kind, **TINY})
    idx = torch.randint(0, 11, (3, 8))  # (B, T)
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 8, 11)
    assert loss.ndim == 0 and torch.isfinite(loss)
    out = sample(model.eval(), idx[:, :2], 10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 12) and int(out.max()) < 11


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = build_model({"type": "gpt", **TINY, "dropout": 0.0}).eval()
    a = torch.randint(0, 11, (1, 8))
    b = a.clone()
    b[0, 5:] = (b[0, 5:] + 1) % 11  # change only the future
    la, _ = model(a)
    lb, _ = model(b)
    assert torch.allclose(la[0, :5], lb[0, :5]) and not torch.allclose(la[0, 5:], lb[0, 5:])


def test_gpt_rejects_sequences_longer_than_block_size():
    model = build_model({"type": "gpt", **TINY})
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_unknown_model_key():
    with pytest.raises(ValueError, match="must be one of bigram, gpt"):
        build_model({"type": "rnn", **TINY})
