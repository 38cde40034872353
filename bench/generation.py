"""Generation speed: lmpipe's `gpt` with its key/value cache vs without it, and vs transformers'
GPT2LMHeadModel.generate(do_sample=True, use_cache=True) on a GPT2Config of the same shape.

A 512-token prompt, 500 new tokens, block_size 1024 (the window never slides), batch 1, a
character-level vocabulary (65, tinyshakespeare's), random weights (nothing is downloaded).
Rounds alternate so machine noise hits every model alike; medians of paired ratios.
The un-cached path recomputes the whole context every token (~20x slower at this size), so by
default it is timed on the first --uncached-tokens of the 500 (contexts 512..561, its cheapest
stretch), side by side with the cached path on the same tokens: a lower bound on the 500-token
ratio. --uncached-tokens 500 times the whole run (about 40 s a round on 2 cores).
Targets: cached / un-cached >= 3x; lmpipe cached / transformers >= 1.0x.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench import quiet_offline_transformers

SHAPE = dict(n_layer=4, n_head=4, n_embd=256, block_size=1024)
VOCAB = 65
PROMPT = 512
NEW = 500


def lmpipe_gpt():
    from models import build_model

    return build_model({"type": "gpt", "vocab_size": VOCAB, "dropout": 0.0, "bias": True,
                        **SHAPE}).eval()


def hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SHAPE["block_size"], n_embd=SHAPE["n_embd"],
                     n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(cfg).eval()


def time_lmpipe(model, prompt: torch.Tensor, new: int, use_cache: bool, seed: int):
    """(seconds, output ids) for sample() with or without the cache."""
    from lmpipe.generate import sample

    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    out = sample(model, prompt, new, generator=gen, use_cache=use_cache)
    return time.perf_counter() - t0, out


@torch.no_grad()
def time_hf(model, prompt: torch.Tensor, new: int, seed: int) -> float:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                         use_cache=True, max_new_tokens=new, min_new_tokens=new, top_k=0,
                         top_p=1.0, temperature=1.0, pad_token_id=0)
    assert out.shape[1] == prompt.shape[1] + new
    return time.perf_counter() - t0


def run_rounds(rounds: int, uncached_tokens: int) -> tuple[dict[str, list[float]], bool]:
    """Seconds per model and round; whether cached and un-cached drew the same tokens."""
    ours, hf = lmpipe_gpt(), hf_gpt2()
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    time_lmpipe(ours, prompt, 20, True, 0)  # warm-up
    time_lmpipe(ours, prompt, 3, False, 0)
    time_hf(hf, prompt, 20, 0)
    secs: dict[str, list[float]] = {"cached": [], "hf": [], "cached_short": [], "uncached": []}
    same = True
    for r in range(rounds):
        for key in ("cached", "hf") if r % 2 == 0 else ("hf", "cached"):  # take turns first
            secs[key].append(time_lmpipe(ours, prompt, NEW, True, r)[0] if key == "cached"
                             else time_hf(hf, prompt, NEW, r))
        t_c, out_c = time_lmpipe(ours, prompt, uncached_tokens, True, r)
        t_u, out_u = time_lmpipe(ours, prompt, uncached_tokens, False, r)
        secs["cached_short"].append(t_c)
        secs["uncached"].append(t_u)
        same = same and torch.equal(out_c, out_u)
    return secs, same


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--uncached-tokens", type=int, default=50)
    args = ap.parse_args(argv)
    quiet_offline_transformers()
    torch.manual_seed(0)
    secs, same = run_rounds(args.rounds, args.uncached_tokens)
    n = args.uncached_tokens

    def ratio(a: str, b: str) -> float:  # paired by round: b's seconds / a's seconds
        return statistics.median(y / x for x, y in zip(secs[a], secs[b], strict=True))

    print(f"generation, shape {SHAPE}, vocab {VOCAB}, batch 1, prompt {PROMPT}, {NEW} new tokens, "
          f"{torch.get_num_threads()} threads, {args.rounds} alternating rounds (medians)")
    for label, key, toks in (("lmpipe gpt, KV cache", "cached", NEW),
                             ("transformers generate, use_cache", "hf", NEW),
                             (f"lmpipe gpt, KV cache (first {n})", "cached_short", n),
                             (f"lmpipe gpt, no cache (first {n})", "uncached", n)):
        print(f"  {label:<40} {toks / statistics.median(secs[key]):>8,.1f} tokens/s")
    print(f"  same tokens with and without the cache: {'yes' if same else 'NO'}")
    print(f"  ratio KV cache / no cache (first {n} tokens): "
          f"{ratio('cached_short', 'uncached'):.1f}x   (goal >= 3x)")
    print(f"  ratio lmpipe KV cache / transformers generate: {ratio('cached', 'hf'):.2f}x   "
          "(goal >= 1.0x)")


if __name__ == "__main__":
    main()
