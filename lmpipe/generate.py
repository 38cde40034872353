"""Sampling text from a trained model: temperature, top-k, a seeded generator."""
from __future__ import annotations

import torch

from lmpipe.common.errors import UserError


@torch.no_grad()
def sample(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, generator: torch.Generator | None = None,
           vocab_limit: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """idx (B, T) → (B, T + max_new_tokens); the context is cropped to the model's block_size.
    vocab_limit: never sample ids at or above it (nanoGPT pads GPT-2's 50257 tokens to 50304).
    use_cache: with a model that has new_cache() (len(cache): the tokens it holds), feed only the
    new token each step and keep the others' keys and values; the output is the same token for
    token (the cache is rebuilt from the cropped window whenever the window slides)."""
    block = model.block_size
    cache = model.new_cache() if use_cache and hasattr(model, "new_cache") else None
    for _ in range(max_new_tokens):
        if cache is None:
            logits, _ = model(idx[:, -block:])  # (B, T, vocab)
        elif 0 < len(cache) < block and len(cache) == idx.size(1) - 1:
            logits, _ = model(idx[:, -1:], cache=cache)  # (B, 1, vocab)
        else:  # first step, or the window slid: every position moved, recompute the window
            cache = model.new_cache()
            logits, _ = model(idx[:, -block:], cache=cache)  # (B, T, vocab)
        idx = torch.cat((idx, _draw(logits[:, -1, :], temperature, top_k, generator, vocab_limit)
                         .to(idx.device)), dim=1)
    return idx


def _draw(logits: torch.Tensor, temperature: float, top_k: int,
          generator: torch.Generator | None, vocab_limit: int | None) -> torch.Tensor:
    """The last position's logits (B, vocab) → one sampled id per row (B, 1), on the CPU."""
    logits = logits / temperature  # (B, vocab)
    if vocab_limit is not None and vocab_limit < logits.size(-1):
        logits[:, vocab_limit:] = -float("inf")
    if top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)  # (B, 1)


def generate_text(model: torch.nn.Module, tok, prompt: str, max_new_tokens: int, temperature: float,
                  top_k: int, seed: int, device: str) -> str:
    """Prompt → prompt + continuation. An empty prompt starts from a newline (or token 0).
    No defaults here: the callers pass the generate section of the config (GenerateConfig), with
    their own overrides (command-line flags, a served model's predict params)."""
    if temperature <= 0:
        raise UserError(f"temperature must be a positive number, got {temperature}")
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    ids = tok.encode(prompt) if prompt else []
    if not ids:
        ids = _start_ids(tok)
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    out = sample(model, torch.tensor([ids], dtype=torch.long, device=device), max_new_tokens,
                 temperature, top_k, gen, vocab_limit=tok.vocab_size)
    text = tok.decode(out[0].tolist())
    return text if prompt else text.lstrip("\n")


def _start_ids(tok) -> list[int]:
    try:
        return tok.encode("\n") or [0]
    except UserError:
        return [0]
