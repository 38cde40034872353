"""Training throughput of lmpipe's `gpt` vs transformers' GPT2LMHeadModel of the same shape.

nanoGPT's CPU shape: n_layer 4, n_head 4, n_embd 128, block 64, batch 12. Both models train with
the same AdamW on the same batches; rounds alternate so machine noise hits both alike.
Target: ratio >= 1.1.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench import quiet_offline_transformers

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)
BATCH = 12
CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"


def corpus_ids() -> tuple[torch.Tensor, int]:
    """tinyshakespeare if it is beside the repo, else the bundled corpus; char-level ids."""
    from lmpipe.data import BUNDLED_CORPORA

    path = CORPUS if CORPUS.exists() else None
    bundled = sorted((BUNDLED_CORPORA / "dear_agnes").glob("*.md"))
    text = path.read_text() if path else "".join(p.read_text() for p in bundled)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    return torch.tensor([stoi[c] for c in text], dtype=torch.long), len(chars)


def lmpipe_gpt(vocab: int, bias: bool):
    from models import build_model

    return build_model({"type": "gpt", "vocab_size": vocab, "dropout": 0.0, "bias": bias, **SHAPE})


def hf_gpt2(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=SHAPE["block_size"], n_embd=SHAPE["n_embd"],
                     n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)

    class Wrap(torch.nn.Module):  # same (logits, loss) interface
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x, y):
            out = self.m(input_ids=x, labels=None)
            logits = out.logits
            return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    return Wrap()


def steps_per_sec(model, data: torch.Tensor, steps: int, seed: int) -> float:
    from lmpipe.train.loop import get_batch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = get_batch(data, SHAPE["block_size"], BATCH, gen, "cpu")
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    quiet_offline_transformers()
    torch.manual_seed(0)
    data, vocab = corpus_ids()
    hf = "transformers GPT2LMHeadModel"
    models = {"lmpipe gpt (bias=false, params.yaml)": lmpipe_gpt(vocab, False),
              "lmpipe gpt (bias=true, as GPT-2)": lmpipe_gpt(vocab, True), hf: hf_gpt2(vocab)}
    for m in models.values():
        steps_per_sec(m, data, 5, 0)  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.rounds):  # alternate, so a noisy moment hits every model alike
        for name, m in models.items():
            rates[name].append(steps_per_sec(m, data, args.steps, r))
    tokens = BATCH * SHAPE["block_size"]
    print(f"training throughput, shape {SHAPE}, batch {BATCH}, {torch.get_num_threads()} threads, "
          f"{args.rounds} alternating rounds x {args.steps} steps (medians)")
    for name, v in rates.items():
        n = sum(p.numel() for p in models[name].parameters())
        print(f"  {name:<38} {statistics.median(v) * tokens:>10,.0f} tokens/s   ({n:,} params)")
    for name in list(models)[:2]:
        # paired by round
        ratio = statistics.median(a / b for a, b in zip(rates[name], rates[hf], strict=True))
        print(f"  ratio {name} / transformers: {ratio:.2f}x")
    print("  target: the params.yaml model >= 1.1x")


if __name__ == "__main__":
    main()
