"""The key/value cache: cached generation equals un-cached generation token for token, and
cached logits equal a full forward pass at every step (lmpipe's gpt)."""
import pytest
import torch

from lmpipe.generate import sample
from models import build_model

TINY = {"type": "gpt", "vocab_size": 13, "block_size": 16, "n_layer": 2, "n_head": 2,
        "n_embd": 16, "dropout": 0.1, "bias": True}


def tiny_gpt(seed: int = 0, **over):
    torch.manual_seed(seed)
    model = build_model({**TINY, **over}).eval()
    for p in model.parameters():  # larger weights than the init: peaked, varied distributions
        torch.nn.init.normal_(p, std=0.3)
    return model


def draw(model, idx, n, seed, use_cache, **kw):
    return sample(model, idx, n, generator=torch.Generator().manual_seed(seed),
                  use_cache=use_cache, **kw)


@pytest.mark.parametrize("prompt_len", [1, 5, 16, 23])  # shorter, equal to, longer than block
@pytest.mark.parametrize("seed,temperature,top_k", [(0, 1.0, 0), (1, 0.7, 5), (2, 1.5, 3)])
def test_cached_generation_equals_uncached(prompt_len, seed, temperature, top_k):
    model = tiny_gpt(seed)
    idx = torch.randint(0, 13, (2, prompt_len), generator=torch.Generator().manual_seed(seed))
    n = 40  # slides the 16-token window many times
    kw = dict(temperature=temperature, top_k=top_k, vocab_limit=11)
    with_cache = draw(model, idx, n, seed, True, **kw)
    without = draw(model, idx, n, seed, False, **kw)
    assert with_cache.shape == (2, prompt_len + n)
    assert torch.equal(with_cache, without)
    assert int(with_cache[:, prompt_len:].max()) < 11


def test_cached_logits_equal_full_forward_at_every_step():
    model = tiny_gpt(3)
    seq = torch.randint(0, 13, (3, 16), generator=torch.Generator().manual_seed(3))  # (B, T)
    full, _ = model(seq)  # (B, T, vocab)
    cache = model.new_cache()
    logits, _ = model(seq[:, :4], cache=cache)  # a prompt, then one token a step
    assert len(cache) == 4
    torch.testing.assert_close(logits, full[:, :4], atol=1e-5, rtol=0)
    for t in range(4, 16):
        logits, _ = model(seq[:, t:t + 1], cache=cache)
        assert logits.shape == (3, 1, 13) and len(cache) == t + 1
        torch.testing.assert_close(logits[:, 0], full[:, t], atol=1e-5, rtol=0)


def test_several_tokens_onto_a_non_empty_cache_are_masked_causally():
    model = tiny_gpt(4)
    seq = torch.randint(0, 13, (2, 16), generator=torch.Generator().manual_seed(4))
    full, _ = model(seq)
    cache = model.new_cache()
    parts = [(0, 3), (3, 4), (4, 9), (9, 16)]  # chunks of 3, 1, 5, 7 tokens
    got = torch.cat([model(seq[:, a:b], cache=cache)[0] for a, b in parts], dim=1)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


def test_a_full_cache_refuses_more_tokens():
    model = tiny_gpt(5)
    cache = model.new_cache()
    model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_without_a_cache_nothing_changes():
    model = tiny_gpt(6)
    seq = torch.randint(0, 13, (2, 16), generator=torch.Generator().manual_seed(6))
    logits, loss = model(seq, seq)
    torch.testing.assert_close(model(seq)[0], logits, atol=0, rtol=0)
    assert loss.ndim == 0


@pytest.mark.parametrize("kind", ["bigram", "nanochat"])
def test_models_without_a_cache_still_generate(kind):
    torch.manual_seed(0)
    model = build_model({**TINY, "type": kind}).eval()
    assert not hasattr(model, "new_cache")
    idx = torch.zeros(1, 20, dtype=torch.long)
    a = draw(model, idx, 10, 0, True)
    assert a.shape == (1, 30) and torch.equal(a, draw(model, idx, 10, 0, False))


@pytest.mark.parametrize("prompt_len", [3, 12])  # 12 + 20 new tokens slides gpt2's 16-token window
def test_gpt2_generates_the_same_with_transformers_cache(prompt_len):
    torch.manual_seed(0)
    model = build_model({"type": "gpt2", "block_size": 16, "hf_config": {
        "vocab_size": 40, "n_positions": 16, "n_layer": 2, "n_head": 2, "n_embd": 8}}).eval()
    idx = torch.randint(0, 40, (1, prompt_len))
    outs = [sample(model, idx, 20, 0.9, 5, torch.Generator().manual_seed(7), use_cache=c)
            for c in (True, False)]
    assert torch.equal(outs[0], outs[1])
