"""Held-out evaluation: validation loss, perplexity and bits per byte (comparable across
tokenizers)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_ids: torch.Tensor, n_bytes: int, block_size: int,
             batch_size: int = 32, max_batches: int = 0, device: str = "cpu") -> dict[str, float]:
    """Mean next-token loss over consecutive, non-overlapping windows of the validation split.

    bits_per_byte = loss / ln 2 × tokens / bytes: the same text scores the same whatever the
    tokenizer.
    """
    model.eval()
    n_windows = (len(val_ids) - 1) // block_size
    starts = torch.arange(n_windows) * block_size  # (W,)
    if max_batches:
        starts = starts[: max_batches * batch_size]
    total_loss, total_tokens = 0.0, 0
    for chunk in starts.split(batch_size):
        x = torch.stack([val_ids[s:s + block_size] for s in chunk.tolist()]).to(device)  # (B, T)
        # (B, T)
        y = torch.stack([val_ids[s + 1:s + 1 + block_size] for s in chunk.tolist()]).to(device)
        logits, _ = model(x)  # (B, T, vocab)
        total_loss += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                      reduction="sum").item()
        total_tokens += y.numel()
    loss = total_loss / total_tokens
    bytes_per_token = n_bytes / len(val_ids)
    return {"val_loss": loss, "perplexity": math.exp(min(loss, 700)),
            "bits_per_byte": loss / math.log(2) / bytes_per_token, "tokens": float(total_tokens)}
