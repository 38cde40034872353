"""`lmpipe ckpt` speed: `list` over 100 checkpoints (target: under 2 s, the whole command), and the
memory `inspect` needs for a ~500 MB checkpoint (target: it memory-maps, so its peak RSS grows by
well under a tenth of the file's size compared with inspecting a tiny checkpoint)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmpipe import checkpoint
from lmpipe.config import Config, ModelConfig
from lmpipe.tokenizer import CharTokenizer

LMPIPE = [sys.executable, "-m", "lmpipe"]


def payload(n_embd: int, n_layer: int, vocab: int, step: int) -> dict:
    from models import build_model

    arch = {"type": "gpt", "n_layer": n_layer, "n_head": 4, "n_embd": n_embd, "block_size": 256, "dropout": 0.0,
            "bias": False}
    model = build_model({**arch, "vocab_size": vocab})
    return {"model_state_dict": model.state_dict(), "hyperparameters": Config(model=ModelConfig(**arch)).to_dict(),
            "vocab_size": vocab, "block_size": 256, "batch_size": 8, "step": step, "model_type": "gpt",
            "source": "bench", "tokenizer": CharTokenizer("abcdefgh").to_json(), "metrics": {"val_loss": 1.0}}


# Linux carries a process's peak RSS across fork and exec, so a child of this (large) process reports
# at least our own peak; a small wrapper process measures its child instead.
_WRAPPER = ("import os, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.exit(r.returncode)")


def run_measured(args: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one fresh process."""
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _WRAPPER, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed")
    return time.perf_counter() - start, int(r.stdout.split()[-1]) * 1024


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="lmpipe-bench-ckpt-"))
    try:
        small = payload(n_embd=32, n_layer=2, vocab=8, step=0)
        for step in range(1, 101):
            checkpoint.save_checkpoint(root / "many" / checkpoint.checkpoint_filename("gpt", "bench", step),
                                       {**small, "step": step})
        times = sorted(run_measured([*LMPIPE, "ckpt", "list", str(root / "many")])[0] for _ in range(3))
        print(f"ckpt list, 100 checkpoints: {times[1]:.2f} s (median of 3; target < 2 s): ratio {times[1] / 2:.2f}")

        tiny = root / "tiny" / checkpoint.checkpoint_filename("gpt", "bench", 1)
        checkpoint.save_checkpoint(tiny, small)
        big = root / "big" / checkpoint.checkpoint_filename("gpt", "bench", 1)
        checkpoint.save_checkpoint(big, payload(n_embd=1024, n_layer=9, vocab=50304, step=1))
        size = big.stat().st_size
        _, base = run_measured([*LMPIPE, "ckpt", "inspect", str(tiny), "--json"])
        _, peak = run_measured([*LMPIPE, "ckpt", "inspect", str(big), "--json"])
        grow = max(peak - base, 0)
        _, full = run_measured([sys.executable, "-c", f"import torch; torch.load({str(big)!r}, weights_only=True)"])
        print(f"(reference: torch.load without mmap peaks at {full / 1e6:.0f} MB, inspect at {peak / 1e6:.0f} MB)")
        print(f"ckpt inspect, {size / 1e6:.0f} MB checkpoint: peak RSS +{grow / 1e6:.0f} MB over a tiny one "
              f"(target < 0.1 of the file): ratio {grow / size:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
