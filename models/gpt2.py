"""A pretrained GPT-2 (transformers' GPT2LMHeadModel) behind lmpipe's model interface:
forward(idx, targets=None, cache=None) -> (logits, loss), block_size, new_cache().

A fresh run loads the weights with from_pretrained (a local directory, or a hub name found in the
local Hugging Face cache); a checkpoint carries the GPT2Config as a dict (hf_config), so the
architecture is rebuilt from it without the hub and the checkpoint's weights are loaded into it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class PretrainedNotFound(Exception):
    """The pretrained model is neither a local directory nor in the local Hugging Face cache."""

    def __init__(self, name: str, looked: str, reason: str):
        super().__init__(f"{name!r}: {reason} (looked in {looked})")
        self.name, self.looked, self.reason = name, looked, reason


@dataclass(frozen=True)
class GPT2ModelConfig:
    vocab_size: int = 0  # the pretrained model's own; kept for the registry's common keys
    block_size: int = 64
    pretrained: str = "gpt2"  # a hub name or a local directory (fresh runs only)
    hf_config: dict[str, Any] | None = None  # GPT2Config.to_dict(): rebuild without the hub


def hub_cache() -> Path:
    """The Hugging Face hub cache as the environment names it now (HF_HUB_CACHE, HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "1").lower() not in ("0", "false", "no")


def locate(name: str) -> str:
    """A directory from_pretrained can load `name` from (a local directory, or the snapshot in the
    hub cache); with HF_HUB_OFFLINE=0 a name not cached is returned as is, to be downloaded.
    Raises PretrainedNotFound."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PretrainedNotFound(name, str(path), "the directory has no config.json")
        return str(path)
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise PretrainedNotFound(name, str(path), "no such directory")
    cache = hub_cache()
    snapshot = _cached_snapshot(name, cache)
    if snapshot is not None:
        return str(snapshot)
    if not offline():
        return name
    raise PretrainedNotFound(name, str(cache / f"models--{name.replace('/', '--')}"),
                             "not in the local Hugging Face cache, and hub downloads are off "
                             "(HF_HUB_OFFLINE=1)")


def _cached_snapshot(name: str, cache: Path) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json", cache_dir=str(cache))
    except Exception:  # an invalid repo id is simply "not cached"
        return None
    return Path(hit).parent if isinstance(hit, str) else None


class KVCache:
    """transformers' DynamicCache under lmpipe's cache protocol: len() is the tokens cached."""

    def __init__(self):
        from transformers import DynamicCache

        self.past = DynamicCache()

    def __len__(self) -> int:
        return int(self.past.get_seq_length())


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2ModelConfig):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bars in lmpipe's output
        if cfg.hf_config:
            self.hf = GPT2LMHeadModel(GPT2Config(**cfg.hf_config))
        else:
            self.hf = GPT2LMHeadModel.from_pretrained(locate(cfg.pretrained))
        n_positions = self.hf.config.n_positions
        if cfg.block_size > n_positions:
            raise ValueError(f"model.block_size={cfg.block_size} is more than the pretrained "
                             f"model's {n_positions} positions (n_positions)")
        self.block_size = cfg.block_size
        self.config = cfg

    @property
    def hf_config(self) -> dict[str, Any]:
        """What a checkpoint stores to rebuild this architecture (JSON-able)."""
        d = self.hf.config.to_dict()
        return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, list, dict))
                or v is None}

    @property
    def vocab_size(self) -> int:
        return self.hf.config.vocab_size

    def enable_gradient_checkpointing(self) -> None:
        self.hf.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        self.hf.config.use_cache = False

    def new_cache(self) -> KVCache:
        return KVCache()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None):
        if cache is not None:  # idx: only the tokens not yet in the cache
            out = self.hf(input_ids=idx, past_key_values=cache.past, use_cache=True)
            cache.past = out.past_key_values
            return out.logits, None
        if idx.size(1) > self.block_size:
            raise ValueError(f"sequence length {idx.size(1)} exceeds block_size {self.block_size}")
        logits = self.hf(input_ids=idx, use_cache=False).logits  # (B, T, vocab)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))
        return logits, loss
