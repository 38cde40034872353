"""`lmpipe ckpt` speed: `list` over 100 checkpoints (target: under 2 s, the whole command), the
memory `inspect` needs for a ~500 MB checkpoint (target: it memory-maps, so its peak RSS grows by
well under a tenth of the file's size compared with inspecting a tiny checkpoint), and the time a
checkpoint takes to verify itself (its zip CRC-32s) per GB, beside the time to read it."""
from __future__ import annotations

import hashlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmpipe.ckpt.payload import build_payload
from lmpipe.ckpt.store import checkpoint_filename, save_checkpoint
from lmpipe.config import Config, ModelConfig
from lmpipe.tokenizer import CharTokenizer

LMPIPE = [sys.executable, "-m", "lmpipe"]


def payload(n_embd: int, n_layer: int, vocab: int, step: int) -> dict:
    from models import build_model

    arch = {"type": "gpt", "n_layer": n_layer, "n_head": 4, "n_embd": n_embd, "block_size": 256,
            "dropout": 0.0,
            "bias": False}
    model = build_model({**arch, "vocab_size": vocab})
    return build_payload(weights=model.state_dict(),
                         hyperparameters=Config(model=ModelConfig(**arch)).to_dict(),
                         tokenizer_json=CharTokenizer("abcdefgh").to_json(), step=step,
                         vocab_size=vocab,
                         block_size=256, source="bench", metrics={"val_loss": 1.0}, batch_size=8)


# Linux carries a process's peak RSS across fork and exec, so a child of this (large) process
# reports at least our own peak; a small wrapper process measures its child instead.
_WRAPPER = ("import os, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


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
            save_checkpoint(root / "many" / checkpoint_filename("gpt", "bench", step),
                                       {**small, "step": step})
        times = sorted(run_measured([*LMPIPE, "ckpt", "list",
                                     str(root / "many")])[0] for _ in range(3))
        print(f"ckpt list, 100 checkpoints: {times[1]:.2f} s (median of 3; target < 2 s): ratio "
              f"{times[1] / 2:.2f}")

        tiny = root / "tiny" / checkpoint_filename("gpt", "bench", 1)
        save_checkpoint(tiny, small)
        big = root / "big" / checkpoint_filename("gpt", "bench", 1)
        save_checkpoint(big, payload(n_embd=1024, n_layer=9, vocab=50304, step=1))
        size = big.stat().st_size
        _, base = run_measured([*LMPIPE, "ckpt", "inspect", str(tiny), "--json"])
        _, peak = run_measured([*LMPIPE, "ckpt", "inspect", str(big), "--json"])
        grow = max(peak - base, 0)
        _, full = run_measured([sys.executable, "-c",
                                f"import torch; torch.load({str(big)!r}, weights_only=True)"])
        print(f"(reference: torch.load without mmap peaks at {full / 1e6:.0f} MB, inspect at "
              f"{peak / 1e6:.0f} MB)")
        print(f"ckpt inspect, {size / 1e6:.0f} MB checkpoint: peak RSS +{grow / 1e6:.0f} MB over a "
              f"tiny one (target < 0.1 of the file): ratio {grow / size:.3f}")
        verify_speed(big)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def read_file(path: Path, digest=None) -> None:
    """Read the file once in 16 MB chunks, feeding `digest` (e.g. a sha256) if given."""
    buf = memoryview(bytearray(16 << 20))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if digest is not None:
                digest.update(buf[:n])


def verify_speed(path: Path | None = None, rounds: int = 3) -> None:
    """selfcheck.self_check's seconds per GB beside a plain read's, alternating on the same file
    (from the page cache: a first read warms it), with the manifest's sha256 for reference."""
    from lmpipe.ckpt.selfcheck import self_check

    root = None
    if path is None:  # run alone: a synthetic ~660 MB checkpoint
        root = Path(tempfile.mkdtemp(prefix="lmpipe-bench-verify-"))
        path = root / checkpoint_filename("gpt", "bench", 1)
        save_checkpoint(path, payload(n_embd=1024, n_layer=9, vocab=50304, step=1))
    jobs = {"verify": lambda: self_check(path), "read": lambda: read_file(path),
            "sha256": lambda: read_file(path, hashlib.sha256())}
    try:
        assert self_check(path).ok  # also warms the page cache
        times: dict[str, list[float]] = {k: [] for k in jobs}
        for r in range(rounds):
            for name in (list(jobs) if r % 2 == 0 else reversed(list(jobs))):
                t0 = time.perf_counter()
                jobs[name]()
                times[name].append(time.perf_counter() - t0)
        gb = path.stat().st_size / 1e9
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    v, r, s = (statistics.median(times[k]) / gb for k in ("verify", "read", "sha256"))
    print(f"self-verify (zip CRC-32s), {gb * 1e3:.0f} MB checkpoint from the page cache, medians "
          f"of {rounds}: self-verify s/GB vs read s/GB: {v:.2f} vs {r:.2f}: ratio {v / r:.2f}  "
          f"(sha256, the manifest check: {s:.2f} s/GB)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
