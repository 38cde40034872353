"""What an lmpipe checkpoint holds, and the one function that builds it.

A checkpoint is data, not objects: state_dicts plus JSON-able metadata, loadable with
`torch.load(path, weights_only=True)`. Keys follow the seed guide (model_state_dict,
optimizer_state_dict, hyperparameters, vocab_size, block_size, batch_size, step) plus the
tokenizer JSON (inference needs no data/ directory), the full training state and a format version.
"""
from __future__ import annotations

from typing import Any

FORMAT_VERSION = 2  # 2: adds train_state (bit-exact resume) and the manifest
REQUIRED_KEYS = ("model_state_dict", "hyperparameters", "vocab_size", "block_size", "step",
                 "tokenizer")
_COMPILE_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DistributedDataParallel wrappers


def current_val_loss(metrics: dict[str, Any], step: int | None) -> float | None:
    """metrics["val_loss"] if it was measured at `step`, else None: a checkpoint saved on a signal
    between evaluations carries the last evaluation's loss, with its step as val_step. Checkpoints
    from before val_step was recorded keep their value."""
    val_step = metrics.get("val_step")
    return None if val_step is not None and val_step != step else metrics.get("val_loss")


def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        for p in _COMPILE_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out




def build_payload(*, weights: dict, hyperparameters: dict, tokenizer_json: str, step: int,
                  vocab_size: int, block_size: int, source: str, optimizer: dict | None = None,
                  run_id: str | None = None, train_state: dict | None = None,
                  metrics: dict | None = None, imported_from: dict | None = None,
                  batch_size: int | None = None, model_type: str | None = None,
                  base_model: dict | None = None, dtype: str | None = None) -> dict[str, Any]:
    """The dictionary a checkpoint file holds (save_checkpoint adds format_version). Training,
    `lmpipe ckpt import` and the tests all build it here. Optional parts left None are left out:
    a checkpoint without train_state is one a resume must restart the optimizer for. A LoRA
    checkpoint's weights are its adapter tensors only, and base_model names the base it adapts
    (name, type, architecture, sha256 of its weights: ckpt/lora.py). dtype: the precision it was
    trained in (train.dtype resolved on the device; the weights are float32)."""
    payload = {"model_state_dict": weights, "optimizer_state_dict": optimizer,
               "hyperparameters": hyperparameters, "vocab_size": vocab_size,
               "block_size": block_size,
               "batch_size": (hyperparameters.get("train") or {}).get("batch_size")
               if batch_size is None else batch_size,
               "step": step, "model_type": model_type or hyperparameters["model"]["type"],
               "source": source,
               "tokenizer": tokenizer_json, "run_id": run_id, "train_state": train_state,
               "metrics": metrics if metrics is not None else {}, "versions": _versions(),
               "imported_from": imported_from, "base_model": base_model, "dtype": dtype}
    return {k: v for k, v in payload.items() if v is not None}


def _versions() -> dict[str, str]:
    import torch

    from lmpipe import __version__

    return {"torch": str(torch.__version__), "lmpipe": __version__}


def architecture(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The model a checkpoint declares, as models.build_model takes it: the model section of its
    hyperparameters with the vocabulary and block size it was built with."""
    hp = ckpt.get("hyperparameters") or {}
    arch = {**(hp.get("model") or {}), "vocab_size": ckpt.get("vocab_size"),
            "block_size": ckpt.get("block_size")}
    arch["type"] = ckpt.get("model_type") or arch.get("type")
    return arch


def weights_sha256(state: dict[str, Any]) -> str:
    """A deterministic hash of a state dict: over its tensors in sorted key order, each as its name,
    dtype, shape and bytes (on the CPU, contiguous). A LoRA checkpoint records its base model's."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
