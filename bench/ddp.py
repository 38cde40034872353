"""Training throughput of one model trained by 1 and by 2 processes (torchrun, DDP), side by side.

The same `gpt` (nanoGPT's CPU shape, bench.throughput.SHAPE) and per-process batch; each process
draws its own batches, so N processes train on N times the tokens per step. tokens/s counts every
process's tokens (the loop's own measure: training time only, no evaluation or saving). On a
machine with fewer cores or GPUs than processes the ratio shows DDP's overhead (the gradient
all-reduce, processes sharing cores), not a speed-up: it says so.

Workers: `python -m bench.ddp --worker` under torchrun (lmpipe.train.launch); imports no MLflow.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

STEPS, LOG = 60, 30  # the first window warms up; the second is the measurement


def worker(device: str, steps: int) -> None:
    """One process of the job: train `steps` steps and, on rank 0, print the last window's
    tokens/s as JSON."""
    import torch

    from bench.throughput import BATCH, SHAPE, corpus_ids
    from lmpipe.common.device import pick_device
    from lmpipe.config import TrainConfig
    from lmpipe.train import distributed
    from lmpipe.train.loop import Callbacks, TrainState, make_optimizer, train
    from models import build_model

    device = pick_device(device)
    group = distributed.start(device)
    device = group.device(device)
    ids, vocab = corpus_ids()
    cfg = TrainConfig(steps=steps, batch_size=BATCH, eval_interval=10 * steps, eval_batches=1,
                      log_interval=LOG, warmup_steps=0, seed=1337)
    torch.manual_seed(cfg.seed)
    model = build_model({"type": "gpt", "vocab_size": vocab, "dropout": 0.0, "bias": False,
                         **SHAPE}).to(device)
    state = TrainState.fresh(cfg)
    state.sampler.manual_seed(distributed.rank_seed(cfg.seed, group.rank))
    windows = []
    train(group.wrap(model, device), make_optimizer(model, cfg), ids, ids[:4096], cfg,
          SHAPE["block_size"], device, Callbacks(on_log=lambda step, m: windows.append(m)), state,
          dtype="bfloat16" if device.startswith("cuda") else "float32", group=group)
    if group.leader:
        print(json.dumps({"tokens_per_sec": windows[-1]["tokens_per_sec"],
                          "backend": group.backend or "none", "device": device}), flush=True)
    group.close()


def measure(nproc: int, device: str, steps: int) -> dict:
    from lmpipe.train.distributed import launch_env

    cmd = [sys.executable, "-m", "lmpipe.train.launch", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "bench.ddp", "--worker", "--device", device,
           "--steps", str(steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=launch_env(nproc, device))
    if r.returncode != 0:
        raise SystemExit(f"bench ddp: nproc {nproc} failed:\n{r.stderr[-2000:]}")
    return json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])


def main(argv: list[str]) -> None:
    from lmpipe.train.distributed import available

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=STEPS)
    args = ap.parse_args(argv)
    have, what = available(args.device)
    print(f"DDP throughput: gpt {args.steps} steps, batch 12 × 64 tokens per process, "
          f"train.device={args.device} ({have} {what})")
    counts = [n for n in (1, 2) if n <= have]
    results = {n: measure(n, args.device, args.steps) for n in counts}
    base = results[1]["tokens_per_sec"]
    for n, r in results.items():
        print(f"  nproc {n}: {r['tokens_per_sec']:>10,.0f} tokens/s ({r['backend']}, {r['device']})"
              f"   ratio {r['tokens_per_sec'] / base:.2f}")
    if 2 not in results:
        print(f"  nproc 2: skipped, this machine has {have} {what}")
    elif "CPU" in what:  # the same cores either way: what DDP gains or loses on them
        verdict = ("so the ratio shows DDP's overhead (gradient all-reduce over gloo, two "
                   "processes on two cores), not a speed-up" if have <= 2 else
                   "the same cores either way")
        print(f"  {have} {what}: nproc 1 trains with {have} threads, nproc 2 with "
              f"{max(1, have // 2)} each; {verdict}. N GPUs give N processes a device each")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=STEPS)
    a, rest = ap.parse_known_args()
    if a.worker:
        worker(a.device, a.steps)
    else:
        main(sys.argv[1:])
