"""GPT-2 parameter counts from GPT2Config (meta device: nothing allocated, nothing downloaded) and
checkpoint sizes: weights fp32 (4 B/param) and a resumable checkpoint (+ AdamW's two fp32 states:
12 B/param). Tied lm_head/wte counted once."""
import torch
from transformers import GPT2Config, GPT2LMHeadModel

for name, (e, L, h) in {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16),
                        "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}.items():
    with torch.device("meta"):
        m = GPT2LMHeadModel(GPT2Config(n_embd=e, n_layer=L, n_head=h))
    n = sum(p.numel() for p in m.parameters())  # parameters() yields the tied weight once
    print(f"| {name} | {n / 1e6:,.1f} M | {4 * n / 2**30:.2f} GiB | {12 * n / 2**30:.2f} GiB |")
