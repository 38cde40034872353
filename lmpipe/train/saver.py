"""When and how checkpoints are written during training (the I/O itself is lmpipe.ckpt.store):

- asynchronous saves: the state is copied into reused CPU buffers, a background thread writes it;
  training waits on the disk only while the previous save is still running;
- retention: keep the last K, the best K by validation loss and every M-th step; never delete the
  resume source or the newest checkpoint, and delete only after the new one is committed;
- disk space: estimate each save, prune by policy if short, else skip it with a warning; a failed
  write (ENOSPC, EFBIG) leaves the earlier checkpoints intact and no temporary behind;
- signals: SIGINT/SIGTERM finish the current step, write a verified checkpoint and stop; a second
  SIGINT abandons that save.
"""
from __future__ import annotations

import shutil
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from lmpipe.ckpt.integrity import verify_checkpoint
from lmpipe.ckpt.manifest import read_manifest
from lmpipe.ckpt.payload import build_payload, current_val_loss
from lmpipe.ckpt.store import (
    checkpoint_filename,
    clean_directory,
    delete_checkpoint,
    parse_filename,
    save_checkpoint,
)
from lmpipe.common.errors import UserError, warn
from lmpipe.common.fileio import SaveAbandoned
from lmpipe.config import CheckpointConfig, Config
from lmpipe.train.distributed import Group

if TYPE_CHECKING:
    from lmpipe.train.loop import TrainState


class TrainingStopped(UserError):
    """Training stopped on a signal after saving a checkpoint; exit 128 + signal number."""

    prefix = ""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig, run_id: str,
                 protect: tuple[Path, ...] = (),
                 on_saved: Callable[[Path, dict], None] | None = None):
        self.dir = Path(directory)
        self.cfg = cfg
        self.run_id = run_id
        self.protect = {p.resolve() for p in protect}
        self.on_saved = on_saved
        self.saved: list[Path] = []
        self.failed: list[str] = []
        self._thread: threading.Thread | None = None
        self._abort = threading.Event()
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.dir.mkdir(parents=True, exist_ok=True)
        for note in clean_directory(self.dir):
            warn(f"{self.dir}: {note}")

    # --- saving ----------------------------------------------------------------------------------

    def save(self, path: Path, payload: dict[str, Any], wait: bool = False) -> None:
        """Save `payload` to `path`. Asynchronous unless disabled or `wait`: returns once the state
        is copied, so the caller may change the weights at once."""
        self.wait()  # the buffers (and the disk) are free again
        size = estimate_bytes(payload)
        if not self._ensure_space(size, path):
            return
        if not self.cfg.async_save or wait:
            self._write(path, payload)
            return
        snapshot = self._snapshot(payload)
        self._thread = threading.Thread(target=self._write, args=(path, snapshot),
                                        name="lmpipe-ckpt", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the pending save is on disk. A Ctrl+C here abandons that save cleanly."""
        if self._thread is None:
            return
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=0.1)
        except KeyboardInterrupt:
            # the writer drops the save once its data is written; no file stays behind
            self._abort.set()
            self._thread.join()
            raise
        self._thread = None

    def _write(self, path: Path, payload: dict[str, Any]) -> None:
        try:
            entry = save_checkpoint(path, payload, abort=self._abort)
        except SaveAbandoned:
            return
        except Exception as e:  # ENOSPC, EFBIG, EIO...: the earlier checkpoints are untouched
            reason = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
            self.failed.append(f"step {payload.get('step')}: {reason}")
            warn(f"checkpoint {path.name} was not saved ({reason}); earlier checkpoints are intact "
                 "and training goes on")
            return
        self.saved.append(path)
        self.apply_retention()
        if self.on_saved:
            self.on_saved(path, entry)

    def _snapshot(self, payload: Any, key: tuple = (), seen: dict | None = None) -> Any:
        """A copy of `payload` whose tensors live in CPU buffers reused from save to save. Tensors
        that are one tensor (tied weights: wte and lm_head) stay one in the copy, so the file
        holds them once, as a synchronous save's does."""
        seen = {} if seen is None else seen
        if isinstance(payload, torch.Tensor):
            alias = (payload.untyped_storage().data_ptr(), payload.storage_offset(),
                     tuple(payload.shape), payload.stride(), payload.dtype, payload.device)
            if alias in seen:
                return seen[alias]
            buf = self._buffers.get(key)
            if buf is None or buf.shape != payload.shape or buf.dtype != payload.dtype:
                buf = self._buffers[key] = torch.empty_like(payload, device="cpu")
            buf.copy_(payload.detach())
            seen[alias] = buf
            return buf
        if isinstance(payload, dict):
            return {k: self._snapshot(v, (*key, k), seen) for k, v in payload.items()}
        if isinstance(payload, (list, tuple)):
            return type(payload)(self._snapshot(v, (*key, i), seen) for i, v in enumerate(payload))
        return payload

    # --- retention and disk space ----------------------------------------------------------------

    def apply_retention(self) -> list[Path]:
        """Delete this run's checkpoints that no rule keeps; return what was deleted."""
        c = self.cfg
        if c.keep_last <= 0:
            return []
        manifest = read_manifest(self.dir)
        # keep_best ranks only val losses measured at the checkpoint's own step: an emergency save
        # repeats an earlier evaluation's loss, and would otherwise be kept as "best" for weights
        # that were never evaluated (and crowd out the checkpoint that earned the number).
        mine = sorted(((e["step"], self.dir / name,
                        current_val_loss(e.get("metrics") or {}, e["step"]))
                       for name, e in manifest.items() if e.get("run_id") == self.run_id
                       and (self.dir / name).exists()), key=lambda t: (t[0], t[1].stat().st_mtime))
        if not mine:
            return []
        keep = {p for _, p, _ in mine[-c.keep_last:]}
        ranked = sorted((t for t in mine if t[2] is not None), key=lambda t: t[2])
        keep |= {p for _, p, _ in ranked[:c.keep_best]}
        if c.keep_every > 0:
            keep |= {p for s, p, _ in mine if s % c.keep_every == 0}
        keep |= {p for _, p, _ in mine if p.resolve() in self.protect}
        keep.add(mine[-1][1])  # the newest, just committed and verified
        doomed = [p for _, p, _ in mine if p not in keep]
        for p in doomed:
            delete_checkpoint(p)
        return doomed

    def _ensure_space(self, size: int, path: Path) -> bool:
        need = int(size * 1.05) + (1 << 20)  # zip/pickle overhead plus room for the manifest
        if shutil.disk_usage(self.dir).free >= need:
            return True
        freed = self.apply_retention()
        if shutil.disk_usage(self.dir).free >= need:
            warn(f"low disk space: pruned {len(freed)} checkpoint(s) by the retention policy")
            return True
        free_mb = shutil.disk_usage(self.dir).free >> 20
        self.failed.append(f"{path.name}: skipped, {need >> 20} MB needed, {free_mb} MB free")
        warn(f"not enough disk space for {path.name} ({need >> 20} MB needed, {free_mb} MB free in "
             f"{self.dir}); skipping this checkpoint and training on; free space or set "
             "checkpoint.keep_last")
        return False


_SIGNAMES = {2: "SIGINT", 15: "SIGTERM"}


class TrainingSaver:
    """The checkpoints of one training run: how each is named and what it holds, when one is due,
    the emergency save on a signal, and the check that the final one was written. Its methods are
    the training loop's saving hooks; `flush` runs before every save (the step metrics up to a
    checkpoint become durable with it), `on_saved` after each one is on disk."""

    def __init__(self, cfg: Config, meta: dict, run_id: str, stop: GracefulStop, *, model,
                 optimizer, tok, flush: Callable[[], None],
                 on_saved: Callable[[Path, dict], None], protect: tuple[Path, ...] = (),
                 dtype: str | None = None, group: Group | None = None):
        self.cfg, self.meta, self.run_id, self.stop = cfg, meta, run_id, stop
        self.group = group or Group()  # a torchrun job: the other ranks' RNG states come along
        self.model, self.optimizer, self.tok = model, optimizer, tok  # what each checkpoint holds
        self.flush, self.on_saved, self.dtype = flush, on_saved, dtype
        self.dir = Path(cfg.checkpoint.dir)
        self.ckpts = Checkpointer(self.dir, cfg.checkpoint, run_id, protect, on_saved=self._saved)

    def due(self, step: int) -> bool:
        return checkpoint_due(self.cfg, step)

    def path(self, step: int) -> Path:
        """checkpoint_{model}_{source}[_{variant slug}]_step..., the slug when model.variant is set
        (GPT2_MODEL_NAME), so that the guide's globs tell gpt2 from gpt2-medium apart."""
        slug = variant_slug(self.cfg.model.variant)
        source = f"{self.meta['source']}_{slug}" if slug else self.meta["source"]
        return self.dir / checkpoint_filename(self.cfg.model.type, source, step)

    def payload(self, step: int, state: TrainState) -> dict:
        cfg, tok = self.cfg, self.tok
        weights, base = model_weights(self.model)
        model = cfg.to_dict()["model"]
        if getattr(self.model, "hf_config", None):  # a pretrained architecture: rebuilt from it
            model["hf_config"] = self.model.hf_config
        return build_payload(
            weights=weights, optimizer=self.optimizer.state_dict(),
            hyperparameters={**cfg.to_dict(), "model": model,
                             "data": data_record(cfg, self.meta)}, dtype=self.dtype,
            tokenizer_json=tok.to_json(), step=step, vocab_size=tok.vocab_size,
            block_size=cfg.model.block_size, source=self.meta["source"], run_id=self.run_id,
            train_state=self.train_state(state), metrics=state.metrics(), base_model=base)

    def train_state(self, state: TrainState) -> dict:
        """The loop state; in a torchrun job also every rank's RNG states (rank_rngs, by rank),
        which makes a resume at the same world size bit-exact (the other ranks send theirs here
        at the same step: distributed.Group.gather_rngs)."""
        own = state.to_dict()
        if not self.group.active:
            return own
        return {**own, "world_size": self.group.world_size,
                "rank_rngs": self.group.gather_rngs(own)}

    def save(self, step: int, state: TrainState, wait: bool = False) -> Path:
        # Metrics up to this step become durable with the checkpoint: after a kill, the resume
        # re-logs every later step, so the run's per-step history stays complete.
        self.flush()
        path = self.path(step)
        self.ckpts.save(path, self.payload(step, state), wait=wait)
        return path

    def stop_requested(self) -> bool:
        return self.stop.requested

    def save_and_stop(self, step: int, state: TrainState) -> None:
        """On SIGINT/SIGTERM: write and verify a checkpoint, then raise TrainingStopped."""
        path = self.save(step, state, wait=True)
        signum = self.stop.signum
        stopped = f"training stopped by {_SIGNAMES.get(signum, f'signal {signum}')} at step {step}"
        if path not in self.saved or not verify_checkpoint(path).ok:
            raise TrainingStopped(f"{stopped}, but the emergency checkpoint could not be written "
                                  f"({'; '.join(self.failed[-1:])})", signum)
        raise TrainingStopped(f"{stopped}; saved and verified {path}\n"
                              f"resume with: lmpipe resume --checkpoint {path}", signum)

    def wait(self) -> None:
        self.ckpts.wait()

    def final(self, step: int) -> Path:
        """The checkpoint of the last step; a UserError when it could not be written."""
        if not self.saved or parse_filename(self.saved[-1])["step"] != step:
            reason = "; ".join(self.failed[-1:]) or "unknown error"
            raise UserError(f"training finished at step {step}, but its final checkpoint could not "
                            f"be written ({reason}); free disk space and resume from the last "
                            "saved checkpoint")
        return self.saved[-1]

    @property
    def saved(self) -> list[Path]:
        return self.ckpts.saved

    @property
    def failed(self) -> list[str]:
        return self.ckpts.failed

    def _saved(self, path: Path, entry: dict) -> None:  # on the writer thread when async
        print(f"saved checkpoint {path}", file=sys.stderr, flush=True)
        self.on_saved(path, entry)


def checkpoint_due(cfg: Config, step: int) -> bool:
    """Whether a periodic checkpoint is due after `step` (the final step is always saved)."""
    return cfg.checkpoint.enabled and step % cfg.checkpoint.interval == 0


def model_weights(model) -> tuple[dict, dict | None]:
    """What a checkpoint stores of `model`: its state_dict; for a LoRA model the adapter tensors
    only, with the identity of its base (ckpt/lora.py)."""
    from models import lora

    if lora.is_lora(model):
        return lora.adapter_state(model), model.base_identity
    return model.state_dict(), None


def variant_slug(variant: str) -> str:
    """model.variant in a file name: a local directory's last component, lowercased, letters and
    digits only (gpt2-medium → gpt2medium)."""
    name = Path(variant.rstrip("/\\")).name if variant else ""
    return "".join(c for c in name.lower() if c.isalnum())


def data_record(cfg: Config, meta: dict) -> dict:
    """The data section of a checkpoint's hyperparameters: the settings and the fingerprint of the
    data this run really trained on (data/prepared), so a resume can find and check it again."""
    return {**asdict(cfg.data), "source": meta.get("source_spec", cfg.data.source),
            "fingerprint": meta.get("fingerprint")}


def estimate_bytes(payload: Any) -> int:
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, dict):
        return sum(estimate_bytes(v) for v in payload.values()) + 64 * len(payload)
    if isinstance(payload, (list, tuple)):
        return sum(estimate_bytes(v) for v in payload)
    return len(payload) if isinstance(payload, (str, bytes)) else 16


class GracefulStop:
    """Within this context SIGINT and SIGTERM request a stop (see `signum`); a second SIGINT raises
    KeyboardInterrupt, which abandons a save in progress. SIGXFSZ is ignored so that a file-size
    limit makes the write fail with EFBIG instead of killing the process."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, quiet: bool = False):
        self.signum: int | None = None
        self.quiet = quiet  # the other ranks of a torchrun job: rank 0 says it
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in (*self.SIGNALS, signal.SIGXFSZ):
                self._previous[s] = signal.signal(s,
                                                  signal.SIG_IGN if s == signal.SIGXFSZ
                                                  else self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if not self.quiet:
            warn(f"received {signal.Signals(signum).name}: finishing this step, then saving a "
                 "checkpoint (press Ctrl+C again to abandon the save)")

    @property
    def requested(self) -> bool:
        return self.signum is not None
