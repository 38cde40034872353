"""Training in several processes with torch.distributed (DistributedDataParallel), launched by
torchrun: `train.nproc: N` (env NPROC) makes lmpipe start `torchrun --standalone --nproc-per-node N`
itself, and a user's own `torchrun ... -m lmpipe stage train` works the same way.

- the backend is NCCL on CUDA (one GPU per process), gloo on the CPU;
- every process draws its own batches, from a sampler seeded by `rank_seed(train.seed, rank)`, so
  the effective batch is batch_size × nproc × grad_accum_steps;
- rank 0 alone tracks (MLflow) and writes checkpoints; the others send it their RNG states at
  every save (`gather_rngs`), so a resume at the same world size continues bit-exactly;
- one collective per step (`agree`) averages the loss for the logs and makes every process stop at
  the same step when one of them got SIGINT/SIGTERM;
- a process that dies makes the others fail at their next collective (torchrun stops the rest);
  a process that hangs makes them fail after TIMEOUT_S seconds (env LMPIPE_DDP_TIMEOUT).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

from lmpipe.common.errors import UserError

TIMEOUT_S = 300  # a collective waits this long at most (env LMPIPE_DDP_TIMEOUT: other seconds)
RNG_KEYS = ("sampler_rng", "torch_rng", "cuda_rng", "python_rng", "numpy_rng")


def launched() -> bool:
    """Whether this process is one of torchrun's workers (it sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def wants_launch(nproc: int) -> bool:
    """Whether training must be started under torchrun: nproc > 1 and not already one of its
    workers."""
    return nproc > 1 and not launched()


def available(device: str) -> tuple[int, str]:
    """How many training processes `device` (train.device) can take here, and what they are."""
    import torch

    from lmpipe.common.device import pick_device

    kind = pick_device(device).split(":")[0]
    if kind == "cuda":
        return torch.cuda.device_count(), "CUDA GPUs"
    if kind == "mps":
        return 1, "MPS device (one process)"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cpus or 1, "CPU cores"


def check_nproc(nproc: int, device: str) -> None:
    """Refuse more processes than the device has GPUs (NCCL: one each) or CPU cores."""
    have, what = available(device)
    if nproc > have:
        raise UserError(f"train.nproc={nproc}: this machine has {have} {what} for train.device="
                        f"{device}; set NPROC (or train.nproc) to at most {have}")


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """torchrun on this machine (--standalone: a local rendezvous on a free port) running
    `python -m lmpipe ARGS` in `nproc` processes (through train.launch: torchrun without its
    closing traceback)."""
    return [sys.executable, "-m", "lmpipe.train.launch", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "lmpipe", *args]


def launch_env(nproc: int, device: str) -> dict[str, str]:
    """The environment for torchrun's processes: on the CPU each gets its share of the cores as
    threads (torchrun's default is one thread each), unless OMP_NUM_THREADS is set already."""
    env = dict(os.environ)
    have, what = available(device)
    if "OMP_NUM_THREADS" not in env and what == "CPU cores":
        env["OMP_NUM_THREADS"] = str(max(1, have // nproc))
    return env


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The data sampler's seed for `rank`: train.seed itself for rank 0 of a fresh run (a single
    process draws what it always did), else a seed derived from (seed, rank, step)."""
    if rank == 0 and step == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class Group:
    """This process's place in the training job: world_size 1 is a plain single process."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether a process group is up (under torchrun, even at world size 1)."""
        return bool(self.backend)

    def device(self, device: str) -> str:
        """cuda → this process's own GPU (cuda:LOCAL_RANK); others unchanged."""
        if self.active and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def wrap(self, model, device: str):
        """The model as DistributedDataParallel (its replicas start from rank 0's weights)."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids)

    def agree(self, loss: float, stop: bool, device: str) -> tuple[float, bool]:
        """The loss averaged over the processes, and whether any of them was asked to stop."""
        if not self.active:
            return loss, stop
        import torch
        import torch.distributed as dist

        t = torch.tensor([loss, float(stop)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t[0].item() / self.world_size, t[1].item() > 0

    def gather_rngs(self, state: dict) -> list[dict]:
        """Every process's RNG states (RNG_KEYS of TrainState.to_dict()), in rank order, at rank 0
        (the other ranks get [])."""
        if not self.active:
            return [state]
        import torch.distributed as dist

        mine = {k: state[k] for k in RNG_KEYS}
        out = [None] * self.world_size if self.leader else None
        dist.gather_object(mine, out, dst=0)
        return out or []

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def start(device: str) -> Group:
    """Join torchrun's job (a Group of world_size 1 outside torchrun); `device` is the resolved
    train.device: NCCL on cuda, gloo elsewhere."""
    if not launched():
        return Group()
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise UserError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', world)} "
                            f"processes on this machine, but it has {torch.cuda.device_count()} "
                            "CUDA GPUs (NCCL needs one per process); lower --nproc-per-node")
        torch.cuda.set_device(local)
    timeout = int(os.environ.get("LMPIPE_DDP_TIMEOUT", TIMEOUT_S))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return Group(rank, world, local, backend)
