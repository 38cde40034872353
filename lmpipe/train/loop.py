"""The training loop: AdamW, linear warmup + cosine decay, gradient clipping, periodic evaluation.

One plain function with callbacks (no Trainer class): the caller decides what a "log" or a
"checkpoint" does (MLflow, files), so the loop itself knows nothing of tracking or storage.
"""
from __future__ import annotations

import contextlib
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from lmpipe.config import TrainConfig
from lmpipe.train.distributed import Group
from lmpipe.train.schedule import Schedule


@dataclass
class Callbacks:
    on_log: Callable[[int, dict], None] | None = None  # every log_interval steps: train metrics
    # every eval_interval steps and at each save: val metrics, and whether a checkpoint is saved
    on_eval: Callable[[int, dict, bool], None] | None = None
    should_save: Callable[[int], bool] = lambda step: False
    on_save: Callable[[int, "TrainState"], None] | None = None
    should_stop: Callable[[], bool] = lambda: False  # checked after every step (signals)
    on_stop: Callable[[int, "TrainState"], None] | None = None  # save, then raise


@dataclass
class TrainState:
    """Everything the loop carries between steps, besides the model and optimizer."""
    schedule: Schedule
    step: int = 0
    best_val_loss: float = float("inf")
    last_val_loss: float = float("nan")
    last_val_step: int | None = None  # the step last_val_loss was measured at
    sampler: torch.Generator = field(default_factory=torch.Generator)  # draws the training batches
    history: list[dict] = field(default_factory=list)

    @classmethod
    def fresh(cls, cfg: TrainConfig) -> "TrainState":
        return cls(Schedule.fresh(cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr),
                   sampler=torch.Generator().manual_seed(cfg.seed))

    def to_dict(self) -> dict:
        """Tensors, numbers and lists only: loadable with torch.load(weights_only=True)."""
        import numpy as np

        np_state = np.random.get_state()
        py_state = random.getstate()
        return {
            "step": self.step, "best_val_loss": self.best_val_loss,
            "last_val_loss": self.last_val_loss,
            "last_val_step": self.last_val_step,
            "schedule": self.schedule.to_dict(), "sampler_rng": self.sampler.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy_rng": [np_state[0], torch.from_numpy(np_state[1].astype("int64")),
                          *map(float, np_state[2:])],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        """Restore the loop state and every RNG the loop draws from (dropout uses torch's global
        one)."""
        import numpy as np

        sampler = torch.Generator()
        sampler.set_state(d["sampler_rng"])
        torch.set_rng_state(d["torch_rng"])
        if d.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(d["cuda_rng"])
        v, state, gauss = d["python_rng"]
        random.setstate((v, tuple(state), gauss))
        name, keys, pos, has_gauss, cached = d["numpy_rng"]
        np.random.set_state((name, keys.numpy().astype("uint32"), int(pos), int(has_gauss), cached))
        return cls(Schedule.from_dict(d["schedule"]), step=d["step"],
                   best_val_loss=d["best_val_loss"],
                   last_val_loss=d["last_val_loss"], sampler=sampler,
                   last_val_step=d.get("last_val_step"))  # absent from older checkpoints' states

    def metrics(self) -> dict:
        """A checkpoint's validation metrics, with the step they come from: a save on a signal
        comes between evaluations, so val_step can be earlier than the checkpoint's own step."""
        return {"val_loss": self.last_val_loss, "best_val_loss": self.best_val_loss,
                "val_step": self.last_val_step}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The fresh-run schedule: linear warmup, then cosine decay from lr to min_lr at the last
    step."""
    return Schedule.fresh(cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr).lr_at(step)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms), as in nanoGPT."""
    from models import param_groups

    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2))


def get_batch(data: torch.Tensor, block_size: int, batch_size: int, gen: torch.Generator,
              device: str) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=gen)  # (B,)
    x = torch.stack([data[i:i + block_size] for i in ix.tolist()])  # (B, T)
    y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix.tolist()])  # (B, T)
    return x.to(device), y.to(device)


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, data: torch.Tensor, block_size: int, batch_size: int,
                  batches: int, seed: int, device: str) -> float:
    """Mean loss on `batches` random batches; a fixed seed makes successive evaluations comparable
    and leaves the training sampler's state untouched."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    losses = [model(*get_batch(data, block_size, batch_size, gen,
                               device))[1].item() for _ in range(batches)]
    model.train(was_training)
    return sum(losses) / len(losses)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_data: torch.Tensor,
          val_data: torch.Tensor, cfg: TrainConfig, block_size: int, device: str,
          callbacks: Callbacks | None = None, state: TrainState | None = None,
          clock: Callable[[], float] = time.monotonic, dtype: str = "float32",
          group: Group | None = None) -> TrainState:
    """Train from state.step to state.schedule.end (cfg.steps for a fresh run); returns the final
    state. Each step draws batch_size × grad_accum_steps sequences, as grad_accum_steps
    micro-batches, under autocast to `dtype` (float32: none; common.device.resolve_dtype).
    `clock` (seconds) times the progress lines: their ETA and heartbeat. In a torchrun job
    (`group`), `model` is the DistributedDataParallel wrapper and every process runs this loop
    on its own batches; they agree on the logged loss and on stopping, and only rank 0 prints."""
    cb = callbacks or Callbacks()
    group = group or Group()
    state = state or TrainState.fresh(cfg)
    total = state.schedule.end
    progress = _Progress(state.step, total, clock=clock, quiet=not group.leader)
    window = _Window(cfg.batch_size * cfg.grad_accum_steps * block_size * group.world_size)
    amp = _Amp(dtype, device)
    model.train()
    while state.step < total:
        t0 = time.perf_counter()
        lr = state.schedule.lr_at(state.step)
        batch = get_batch(train_data, block_size, cfg.batch_size * cfg.grad_accum_steps,
                          state.sampler, device)
        loss = _step(model, optimizer, batch, lr, cfg, amp)
        state.step += 1
        # one collective: the loss averaged over the processes, and a stop if any was asked to
        loss, stop = group.agree(loss, cb.should_stop(), device)
        window.add(loss, time.perf_counter() - t0)

        logged = state.step % cfg.log_interval == 0 or state.step == total
        metrics = window.metrics(lr)
        progress.update(state.step, metrics, logged, window.steps)
        if logged:
            state.history.append({"step": state.step, **metrics})
            if cb.on_log:
                cb.on_log(state.step, metrics)
            window = _Window(window.tokens_per_step)
        if stop:
            progress.close()
            if cb.on_stop:
                cb.on_stop(state.step, state)
            return state
        saving = cb.on_save is not None and (cb.should_save(state.step) or state.step == total)
        # every checkpoint gets a val loss
        if saving or state.step % cfg.eval_interval == 0 or state.step == total:
            val = _evaluate(getattr(model, "module", model), val_data, cfg, block_size, device,
                            state)
            progress.note(f"step {state.step}: val loss {val:.4f}")
            if cb.on_eval:
                cb.on_eval(state.step, {"val_loss": val}, saving)
        if saving:
            cb.on_save(state.step, state)
    progress.close()
    return state


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          batch: tuple[torch.Tensor, torch.Tensor], lr: float, cfg: TrainConfig,
          amp: "_Amp") -> float:
    """One optimizer step on `batch` at learning rate `lr`, its gradient accumulated over
    cfg.grad_accum_steps micro-batches; returns the batch's mean loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    accum, total = cfg.grad_accum_steps, 0.0
    for i, (x, y) in enumerate(zip(batch[0].chunk(accum), batch[1].chunk(accum), strict=True)):
        # DDP: gradients are averaged across processes on the last micro-batch only
        local = model.no_sync() if hasattr(model, "no_sync") and i < accum - 1 \
            else contextlib.nullcontext()
        with local:
            with amp.autocast():
                _, loss = model(x, y)
            amp.backward(loss / accum)
        total += loss.item()
    amp.step(optimizer, model, cfg.grad_clip)
    return total / accum


class _Amp:
    """Mixed precision for one dtype: autocast (bfloat16, float16) and, for float16, a GradScaler.
    float32 does nothing."""

    def __init__(self, dtype: str, device: str):
        self.device_type = device.split(":")[0]
        self.dtype = None if dtype == "float32" else getattr(torch, dtype)
        self.scaler = torch.amp.GradScaler(self.device_type) if dtype == "float16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
             grad_clip: float) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()


def _evaluate(model: torch.nn.Module, val_data: torch.Tensor, cfg: TrainConfig, block_size: int,
              device: str, state: TrainState) -> float:
    """The val loss at state.step, recorded in the state and its history."""
    val = estimate_loss(model, val_data, block_size, cfg.batch_size, cfg.eval_batches, cfg.seed + 1,
                        device)
    state.last_val_loss, state.last_val_step = val, state.step
    state.best_val_loss = min(state.best_val_loss, val)
    state.history.append({"step": state.step, "val_loss": val})
    return val


class _Window:
    """The steps since the last log line: their summed loss, and their training time only
    (evaluation and saving do not count against tokens/s)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.loss, self.steps, self.time = 0.0, 0, 0.0

    def add(self, loss: float, seconds: float) -> None:
        self.loss, self.steps, self.time = self.loss + loss, self.steps + 1, self.time + seconds

    def metrics(self, lr: float) -> dict[str, float]:
        return {"train_loss": self.loss / self.steps, "lr": lr,
                "tokens_per_sec": self.tokens_per_step * self.steps / max(self.time, 1e-9)}


HEARTBEAT_S = 10.0  # a progress line at least this often, so a slow log interval still shows life


class _Progress:
    """Progress lines on stderr, terminal or not (CI, pipes, DVC): one per log interval, and one at
    least every `heartbeat` seconds between them. A terminal also gets a live tqdm bar."""

    def __init__(self, start: int, total: int, heartbeat: float = HEARTBEAT_S,
                 clock: Callable[[], float] = time.monotonic, quiet: bool = False):
        self.start, self.total, self.heartbeat, self.clock = start, total, heartbeat, clock
        self.start_time = self.last_line = clock()
        self.bar, self.quiet = None, quiet
        if sys.stderr.isatty() and not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, m: dict, logged: bool, steps: int) -> None:
        """After every step. m: train_loss, lr, tokens_per_sec over the `steps` steps since the
        last log line; `logged`: a log interval ends here. Between intervals a line is printed only
        when the heartbeat is due, and its loss is the running mean so far."""
        now = self.clock()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if logged:
                self.bar.set_postfix(loss=f"{m['train_loss']:.4f}",
                                     tok_s=f"{m['tokens_per_sec']:,.0f}", refresh=False)
        if not logged and now - self.last_line < self.heartbeat:
            return
        self.last_line = now
        eta = (now - self.start_time) / max(step - self.start, 1) * (self.total - step)
        loss = f"{m['train_loss']:.4f}" + ("" if logged else f" (running mean of {steps} steps)")
        self.note(f"step {step}/{self.total} | loss {loss} | lr {m['lr']:.2e} | "
                  f"{m['tokens_per_sec']:,.0f} tok/s | eta {eta:.0f}s")

    def note(self, text: str) -> None:
        if self.quiet:
            return
        (self.bar.write if self.bar is not None else lambda s: print(s, file=sys.stderr,
                                                                     flush=True))(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
