"""What a resume will do, decided before anything is written: the schedule it follows, the data it
trains on, the architecture it keeps, and a readable plan of all three (`lmpipe resume --dry-run`).

A resume without a new source continues on the checkpoint's own data, identified by the data
fingerprint the checkpoint records; the prepared copy under data/prepared is only a cache of it.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from lmpipe import data
from lmpipe.common.errors import UserError, joined
from lmpipe.config import Config, DataConfig, config_from_dict
from lmpipe.train.schedule import Schedule

REWARMUP = 100  # default --warmup with --no-optimizer: a fresh AdamW needs a few steps to settle


@dataclass(frozen=True)
class Resume:
    """What `lmpipe resume` asks for. With no steps/lr/no_optimizer, training continues to the run's
    planned total, bit-exact with the uninterrupted run."""
    checkpoint: Path
    steps: int | None = None  # train this many more steps past the checkpoint
    lr: float | None = None  # restart the schedule from this peak
    no_optimizer: bool = False  # fresh optimizer state, with a re-warmup of `warmup` steps
    warmup: int = 0
    # train to this step (params path: train.steps); None: the planned total
    total: int | None = None


def has_train_state(ckpt: dict) -> bool:
    return "train_state" in ckpt


def plan(ckpt: dict, resume: Resume) -> Schedule:
    """The schedule a resume follows: the checkpoint's own (bit-exact continuation), or a new
    segment from the checkpoint's step when steps, the LR or the optimizer change."""
    step, schedule = ckpt["step"], _saved_schedule(ckpt, resume)
    more = resume.steps
    if more is None and resume.total is not None and resume.total != schedule.end:
        more = resume.total - step
    if more is not None or resume.lr is not None or resume.no_optimizer:
        more = more if more is not None else schedule.end - step
        schedule = schedule.extended(step, more, lr=resume.lr,
                                     warmup=min(resume.warmup, max(more, 0)))
    if step >= schedule.end:
        raise UserError(f"{resume.checkpoint}: already at step {step}, the run's planned total; "
                        "pass --steps N to train N more steps")
    return schedule


def _saved_schedule(ckpt: dict, resume: Resume) -> Schedule:
    """The checkpoint's schedule; for one without a training state (imported, or an older lmpipe)
    the fresh schedule its hyperparameters describe, which only a fresh optimizer may continue."""
    if has_train_state(ckpt):
        return Schedule.from_dict(ckpt["train_state"]["schedule"])
    if not resume.no_optimizer:
        origin = (ckpt.get("imported_from") or {}).get("format")
        writer = "imported from " + origin if origin else "written by an older lmpipe"
        raise UserError(f"{resume.checkpoint}: checkpoint has no training state ({writer}); "
                        "resume it with a fresh optimizer: lmpipe resume --checkpoint "
                        f"{resume.checkpoint} --no-optimizer --warmup {REWARMUP}")
    t = config_from_dict(ckpt["hyperparameters"]).train
    return Schedule.fresh(max(t.steps, ckpt["step"]), t.warmup_steps, t.lr, t.min_lr)


def check_architecture(ckpt: dict, model_cfg, path: Path, how: str) -> None:
    """A resume trains the checkpoint's own architecture: refuse a configuration that asks for
    another one (it would be silently ignored, and recorded as if it had been trained)."""
    saved = config_from_dict(ckpt["hyperparameters"]).model
    default = type(saved)()
    keys = [k for k in asdict(saved) if getattr(saved, k) != getattr(model_cfg, k)
            # which pretrained model it started from: part of the checkpoint, unless asked for
            and not (k in ("pretrained", "variant")
                     and getattr(model_cfg, k) == getattr(default, k))]
    if keys:
        has = ", ".join(f"{k}={getattr(saved, k)}" for k in keys)
        asked = joined([str(getattr(model_cfg, k)) for k in keys])
        raise UserError(f"{how} resumes {path}: checkpoint has {has}; you asked for {asked}. Set "
                        + " ".join(f"model.{k}={getattr(saved, k)}" for k in keys)
                        + " to resume it, or train the new architecture from scratch "
                          "(train.resume=''); "
                        f"'lmpipe ckpt doctor {path} -S "
                        f"model.{keys[0]}={getattr(model_cfg, keys[0])}' lists the tensors")


def check_new_source(ckpt: dict, new_source: str, val_fraction: float, seed: int) -> None:
    """New data must be encodable by the checkpoint's tokenizer (a char vocabulary lists the
    characters it lacks)."""
    from lmpipe.ckpt.rebuild import tokenizer_from_checkpoint

    corpus = data.split_corpus(new_source, val_fraction, seed, ckpt["block_size"] + 1)
    try:
        tokenizer_from_checkpoint(ckpt).encode(corpus.text("train") + corpus.text("val"))
    except UserError as e:
        raise UserError(f"{new_source}: {e}".replace("rebuild the tokenizer on data that contains "
                                                     "them",
                                                     "train a new model on this data")) from None


# --- the data a resume trains on -----------------------------------------------------------------

@dataclass(frozen=True)
class DataChoice:
    """The data settings a resume trains on, and whether data/prepared must be (re)written first."""
    data: DataConfig
    prepare: bool
    fingerprint: str | None  # of the corpus as it is now
    note: str = ""  # one line for the user, if anything is not as they might assume


def recorded_data(ckpt: dict) -> tuple[DataConfig, str | None]:
    """The data settings a checkpoint was trained with, and its data fingerprint (None before
    lmpipe recorded one, and in imported checkpoints)."""
    hp = ckpt["hyperparameters"]
    return config_from_dict(hp).data, (hp.get("data") or {}).get("fingerprint")


def own_data(ckpt: dict, path: Path) -> DataChoice:
    """A resume without --source continues on the checkpoint's own data: re-prepared from its
    recorded source when data/prepared holds other data; refused if that source is gone or
    changed."""
    saved, want = recorded_data(ckpt)
    try:
        source = data.resolve_source(saved.source)
    except UserError:
        raise UserError(f"{path}: its training data {saved.source!r} is not here any more; pass "
                        "--source PATH to continue on other data, or restore it") from None
    now = data.fingerprint(source, saved.val_fraction, saved.seed)
    if want is not None and now != want:
        raise UserError(f"{path}: its training data {saved.source!r} has changed since the "
                        f"checkpoint was written (fingerprint {now[:12]}, recorded {want[:12]}); "
                        f"pass --source {saved.source} to continue on its current content, or "
                        "restore the original")
    prepared = _prepared_fingerprint()
    note = "" if want else (f"{path} records no data fingerprint (an older or imported "
                            f"checkpoint): continuing on {saved.source} as it is now")
    if prepared != now:
        note = note or ("data/prepared holds other data; re-preparing the checkpoint's own data "
                        f"from {saved.source} (fingerprint {now[:12]})")
    return DataChoice(saved, prepared != now, now, note)


def new_data(cfg: Config, source: str) -> DataChoice:
    """--source: continue on new data, prepared with the current data settings."""
    chosen = DataConfig(source=source, val_fraction=cfg.data.val_fraction, seed=cfg.data.seed)
    fp = data.fingerprint(data.resolve_source(source), chosen.val_fraction, chosen.seed)
    return DataChoice(chosen, True, fp)


def _prepared_fingerprint() -> str | None:
    meta = data.PREPARED_DIR / "meta.json"
    try:
        return json.loads(meta.read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def say(line: str) -> None:
    if line:
        print(f"lmpipe: {line}", file=sys.stderr, flush=True)


# --- the plan, in words --------------------------------------------------------------------------

def describe(ckpt: dict, path: Path, resume: Resume, choice: DataChoice) -> str:
    """What `lmpipe resume` would do: from/to step, LR schedule, data, optimizer."""
    s = plan(ckpt, resume)
    fp = (choice.fingerprint or "unknown")[:12]
    optimizer = ("reset (fresh AdamW state"
                 + (f", {s.warmup}-step LR re-warmup)" if s.warmup else ")")
                 if resume.no_optimizer else "restored from the checkpoint")
    same = s.start == 0 or (has_train_state(ckpt)
                            and s == Schedule.from_dict(ckpt["train_state"]["schedule"]))
    lines = [
        f"resume plan for {path}",
        f"  from step {ckpt['step']} to step {s.end} ({s.end - ckpt['step']} steps)",
        f"  learning rate: {_schedule_words(s, ckpt['step'])}"
        + (" (the run's own schedule: bit-exact with an uninterrupted run)" if same else ""),
        f"  data: {choice.data.source} (fingerprint {fp})"
        + ("; data/prepared will be re-written from it" if choice.prepare else ""),
        f"  optimizer state: {optimizer}",
    ]
    return "\n".join(lines)


def _schedule_words(s: Schedule, step: int) -> str:
    warming = s.warmup and step < s.start + s.warmup
    warm = f"warmup {s.warmup} steps to {s.peak:.3g}, then " if warming else ""
    return (f"{warm}cosine decay from {s.lr_at(step):.3g} at step {step} to {s.floor:.3g} "
            f"at step {s.end}")
