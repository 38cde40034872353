"""Checkpoint saving: the training stall per checkpoint, synchronous vs asynchronous, for a GPT-2
small-sized model (124M parameters) with AdamW state, and save throughput vs `dd conv=fsync`.

Targets: asynchronous stall <= 15% of the synchronous save; throughput >= 0.5 of dd's.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from lmpipe.ckpt.payload import build_payload
from lmpipe.config import CheckpointConfig, TrainConfig
from lmpipe.train.loop import TrainState, make_optimizer
from lmpipe.train.saver import Checkpointer

SHAPE = dict(vocab_size=50304, block_size=256, n_layer=12, n_head=12, n_embd=768, dropout=0.0,
             bias=False)


def model_and_optimizer():
    from models import build_model

    torch.manual_seed(0)
    model = build_model({"type": "gpt", **SHAPE})
    opt = make_optimizer(model, TrainConfig())
    x = torch.randint(0, SHAPE["vocab_size"], (1, 16))
    model(x, x)[1].backward()
    opt.step()  # AdamW state exists now: exp_avg and exp_avg_sq for every parameter
    return model, opt


def payload(model, opt, step: int) -> dict:
    return build_payload(weights=model.state_dict(), optimizer=opt.state_dict(),
                         hyperparameters={"model": {"type": "gpt", **SHAPE}}, tokenizer_json="{}",
                         step=step,
                         vocab_size=SHAPE["vocab_size"], block_size=SHAPE["block_size"],
                         source="bench",
                         run_id="bench", train_state=TrainState.fresh(TrainConfig()).to_dict(),
                         batch_size=1)


def dd_seconds(target: Path, nbytes: int) -> float:
    """Seconds `dd conv=fsync` takes to write `nbytes` to `target` (the same disk)."""
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={max(1, nbytes >> 24)}",
                    "conv=fsync"], check=True, capture_output=True)
    dt = time.perf_counter() - t0
    target.unlink()
    return dt


def main(rounds: int = 5) -> None:
    from lmpipe.ckpt.store import save_checkpoint

    model, opt = model_and_optimizer()
    n_params = sum(p.numel() for p in model.parameters())
    directory = Path(tempfile.mkdtemp(prefix=".bench-ckpt-", dir=Path.cwd()))

    def name(i: int) -> Path:
        return directory / f"checkpoint_gpt_bench_step{i:04d}_01012026_000000.pt"

    try:
        # Throughput: lmpipe's save (atomic write + sha256 + manifest + fsync) vs dd, in ABBA order
        # per round (this shared disk slows down after each burst), compared round by round.
        save_s, dd_s = [], []
        size = 0

        def timed_save(r: int) -> None:
            nonlocal size
            os.sync()  # every timed write starts with no other dirty pages to flush
            t0 = time.perf_counter()
            save_checkpoint(name(r), payload(model, opt, r))
            save_s.append(time.perf_counter() - t0)
            size = name(r).stat().st_size
            name(r).unlink()

        # warm-up: first-touch costs are not the disk's
        save_checkpoint(name(99), payload(model, opt, 99))
        name(99).unlink()
        for r in range(rounds):
            if r % 2 == 0:
                timed_save(r)
                dd_s.append(dd_seconds(directory / "dd.bin", size))
            else:
                dd_s.append(dd_seconds(directory / "dd.bin", size))
                timed_save(r)
        # Stall: how long training waits in Checkpointer.save, synchronous vs asynchronous.
        stalls: dict[str, list[float]] = {"sync": [], "async": []}
        totals = []
        for mode in ("sync", "async"):
            ck = Checkpointer(directory,
                              CheckpointConfig(dir=str(directory), async_save=mode == "async"),
                              "bench")
            # the first save of each mode is a warm-up (async: buffer allocation)
            for r in range(rounds + 1):
                os.sync()
                t0 = time.perf_counter()
                ck.save(name(100 + r), payload(model, opt, r))
                stall = time.perf_counter() - t0
                ck.wait()
                if r:
                    stalls[mode].append(stall)
                    totals.append(time.perf_counter() - t0) if mode == "async" else None
                name(100 + r).unlink()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if os.environ.get("BENCH_VERBOSE"):
        print("save", [round(x, 2) for x in save_s], "dd", [round(x, 2) for x in dd_s], stalls)
    s, a = statistics.median(stalls["sync"]), statistics.median(stalls["async"])
    save_rate, dd_rate = size / statistics.median(save_s), size / statistics.median(dd_s)
    paired = statistics.median(d / v for d, v in zip(dd_s, save_s, strict=True))
    print(f"checkpoint saving: {n_params / 1e6:.0f}M parameters + AdamW state, {size / 1e9:.2f} GB "
          f"per checkpoint, medians of {rounds}")
    print(f"  synchronous save: training stalls {s:6.2f} s")
    print(f"  asynchronous save: training stalls {a:6.2f} s (snapshot into reused CPU buffers); "
          f"the write finishes {statistics.median(totals):.2f} s after save() was called")
    print(f"  stall ratio async/sync: {a / s:.2f}  (target <= 0.15)")
    print(f"  save throughput {save_rate / 1e6:,.0f} MB/s vs dd conv=fsync {dd_rate / 1e6:,.0f} "
          f"MB/s on the same disk: {paired:.2f} (median of paired rounds)  (target >= 0.5)")


if __name__ == "__main__":
    main()
