"""The train stage: tokenized data + a model (fresh, or resumed from a checkpoint) + the loop,
wired to checkpoints (train.saver.TrainingSaver) and MLflow (tracking.runs.TrainingTracker)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from lmpipe import data, tokenizer, tracking
from lmpipe.ckpt.rebuild import (
    check_optimizer_state,
    model_from_checkpoint,
    tokenizer_from_checkpoint,
)
from lmpipe.ckpt.store import load_checkpoint
from lmpipe.common.device import pick_device, resolve_dtype
from lmpipe.common.errors import UserError
from lmpipe.config import Config, config_from_dict
from lmpipe.tracking import runs
from lmpipe.train import distributed
from lmpipe.train.attempts import record_run_id
from lmpipe.train.distributed import Group
from lmpipe.train.loop import Callbacks, TrainState, make_optimizer, train
from lmpipe.train.resume import Resume, has_train_state, plan, say
from lmpipe.train.saver import GracefulStop, TrainingSaver, checkpoint_due, variant_slug
from models import build_model


@dataclass
class Setup:
    """What a training run starts from: the model, optimizer, loop state and tokenizer (fresh, or
    from the checkpoint), and, filled in by set_up, the device and the prepared data, encoded."""
    cfg: Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state: TrainState
    tok: object
    parent_run_id: str | None = None
    device: str = "cpu"
    dtype: str = "float32"  # train.dtype resolved on the device (autocast; weights stay float32)
    meta: dict = field(default_factory=dict)  # data/prepared/meta.json
    train_ids: torch.Tensor | None = None
    val_ids: torch.Tensor | None = None

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def encode_split(tok, path: str | Path, block_size: int, split: str) -> torch.Tensor:
    try:
        ids = torch.tensor(tok.encode(Path(path).read_text(encoding="utf-8")), dtype=torch.long)
    except UserError as e:  # e.g. new data with characters the checkpoint's char vocabulary lacks
        raise UserError(f"{path} ({split} split): {e}") from None
    if len(ids) <= block_size + 1:
        raise UserError(f"{path}: the {split} split has {len(ids)} tokens, not more than one "
                        f"training block (model.block_size={block_size}); add text or lower "
                        "model.block_size")
    return ids


def fresh_setup(cfg: Config, device: str, group: Group | None = None) -> Setup:
    s = lora_setup(cfg, device) if cfg.model.lora_r > 0 else model_setup(cfg, device)
    if group is not None and group.rank > 0:  # its own batches and dropout; rank 0's weights
        reseed(s.state, group.rank, cfg.train.seed)
    return s


def model_setup(cfg: Config, device: str) -> Setup:
    tok = tokenizer.load()
    torch.manual_seed(cfg.train.seed)
    model = (pretrained_model(cfg, tok) if cfg.model.type == "gpt2"
             else build_model({**asdict(cfg.model), "vocab_size": tok.vocab_size})).to(device)
    return Setup(cfg, model, make_optimizer(model, cfg.train), TrainState.fresh(cfg.train), tok)


def reseed(state: TrainState, rank: int, seed: int) -> None:
    """This process's own RNG streams (data sampler, dropout), derived from the seed, its rank and
    the step it starts at (distributed.rank_seed)."""
    derived = distributed.rank_seed(seed, rank, state.step)
    state.sampler = torch.Generator().manual_seed(derived)
    torch.manual_seed(derived)


def lora_setup(cfg: Config, device: str) -> Setup:
    """A LoRA run: the base (gpt: the lmpipe checkpoint model.pretrained names, whose architecture
    and tokenizer the run keeps; gpt2: the pretrained model) with fresh adapters; only the
    adapters train."""
    from lmpipe.ckpt.lora import base_for_training, lora_settings, wrap_base

    cfg, base, tok, identity = base_for_training(cfg, tokenizer.load)
    torch.manual_seed(cfg.train.seed)  # the adapters' initialisation
    model = wrap_base(base, identity, lora_settings(asdict(cfg.model))).to(device).train()
    return Setup(cfg, model, make_optimizer(model, cfg.train), TrainState.fresh(cfg.train), tok)


def pretrained_model(cfg: Config, tok):
    """model.type gpt2: the pretrained weights (model.pretrained), whose tokenizer `tok` must be."""
    where = tokenizer.locate_pretrained(cfg.model.pretrained)
    try:
        model = build_model({**asdict(cfg.model), "pretrained": where})
    except (ValueError, OSError) as e:  # block_size beyond n_positions; unreadable model files
        raise UserError(f"model.pretrained={cfg.model.pretrained!r}: {e}") from None
    if model.vocab_size != tok.vocab_size:
        raise UserError(f"{tokenizer.TOKENIZER_FILE} has {tok.vocab_size} tokens, "
                        f"model.pretrained={cfg.model.pretrained!r} {model.vocab_size}; rebuild "
                        "the tokenizer with 'lmpipe stage tokenizer' (tokenizer.kind auto)")
    return model


def precision(s: Setup) -> Setup:
    """train.gradient_checkpointing and train.dtype applied to the model on s.device."""
    if s.cfg.unsupported_gradient_checkpointing():
        raise UserError(s.cfg.unsupported_gradient_checkpointing())
    if s.cfg.train.gradient_checkpointing:
        s.model.enable_gradient_checkpointing()
    return replace(s, dtype=resolve_dtype(s.cfg.train.dtype, s.device))


def resume_setup(cfg: Config, resume: Resume, device: str, group: Group) -> Setup:
    """Model, tokenizer, training settings and loop state from the checkpoint; data, checkpoint and
    tracking settings from the current configuration."""
    ckpt = load_checkpoint(resume.checkpoint, map_location=device)
    schedule = plan(ckpt, resume)  # checks the plan (and that there is a training state) first
    saved = config_from_dict(ckpt["hyperparameters"])
    cfg = replace(cfg, model=saved.model, tokenizer=saved.tokenizer,
                  train=replace(saved.train, device=cfg.train.device))
    model = model_from_checkpoint(ckpt, device).train()
    optimizer = make_optimizer(model, cfg.train)
    if not resume.no_optimizer:
        check_optimizer_state(ckpt, optimizer, resume.checkpoint)
        optimizer.load_state_dict(ckpt["optimizer_state_dict"])
    state = _loop_state(ckpt, resume, cfg, group)
    state.schedule = schedule
    return Setup(cfg, model, optimizer, state, tokenizer_from_checkpoint(ckpt), ckpt.get("run_id"))


def _loop_state(ckpt: dict, resume: Resume, cfg: Config, group: Group) -> TrainState:
    """The saved loop state and RNGs (this rank's, in a torchrun job; re-derived from the seed when
    the checkpoint was written by another number of processes); a checkpoint without one
    (imported) starts a fresh state at its step, seeded from train.seed."""
    if has_train_state(ckpt):
        saved = ckpt["train_state"]
        ranks = saved.get("rank_rngs") or [{}]  # a single process's checkpoint: its own only
        if len(ranks) == group.world_size:
            return TrainState.from_dict({**saved, **ranks[group.rank]})
        state = TrainState.from_dict(saved)
        reseed(state, group.rank, cfg.train.seed)
        if group.leader:
            say(f"{resume.checkpoint} was written by {len(ranks)} training process(es), this run "
                f"has {group.world_size}: weights, optimizer and schedule are restored, each "
                "process's data sampler is re-derived from train.seed; the result is not "
                "bit-exact with a run that kept one number of processes")
        return state
    torch.manual_seed(cfg.train.seed)  # dropout draws from the global generator
    say(f"{resume.checkpoint} has no training state: starting a fresh one at step "
        f"{ckpt['step']}, with a new "
        f"optimizer and a {resume.warmup}-step learning-rate re-warmup")
    state = TrainState.fresh(cfg.train)
    state.step = ckpt["step"]
    return state


def set_up(cfg: Config, resume: Resume | None, group: Group, device: str) -> Setup:
    """The model, optimizer, loop state and tokenizer (fresh, or from the checkpoint) and the
    prepared data, encoded; train.nproc as it really is (torchrun's world size)."""
    s = precision(replace(resume_setup(cfg, resume, device, group) if resume
                          else fresh_setup(cfg, device, group), device=device))
    s.cfg = replace(s.cfg, train=replace(s.cfg.train, nproc=group.world_size))
    meta, block = data.load_meta(), s.cfg.model.block_size
    train_ids = encode_split(s.tok, meta["train"], block, "train")
    val_ids = encode_split(s.tok, meta["val"], block, "val")
    return replace(s, device=device, meta=meta, train_ids=train_ids, val_ids=val_ids)


def run_training(cfg: Config, entry: str, resume: Resume | None = None,
                 out: Path | None = None) -> dict | None:
    """Train (from scratch, or on from a checkpoint); return paths, the run id and final metrics.
    out: a directory of this call's own (train.attempts) for the training log and plot, and the
    run id as soon as the run starts; None: outputs/. In a torchrun job every process calls this;
    rank 0 tracks, saves and returns the result, the others return None."""
    device = pick_device(cfg.train.device)
    group = distributed.start(device)
    try:
        s = set_up(cfg, resume, group, group.device(device))
        return _lead(s, entry, resume, out, group) if group.leader else _follow(s, group)
    finally:
        group.close()


def _follow(s: Setup, group: Group) -> None:
    """A rank > 0 of a torchrun job: trains on its own batches, and at every save and stop sends
    rank 0 its RNG states; it neither tracks nor writes."""
    cfg = s.cfg
    with GracefulStop(quiet=True) as stop:
        hooks = Callbacks(should_save=lambda step: checkpoint_due(cfg, step),
                          on_save=lambda step, state: group.gather_rngs(state.to_dict()),
                          should_stop=lambda: stop.requested,
                          on_stop=lambda step, state: group.gather_rngs(state.to_dict()))
        train(group.wrap(s.model, s.device), s.optimizer, s.train_ids, s.val_ids, cfg.train,
              cfg.model.block_size, s.device, hooks, s.state, dtype=s.dtype, group=group)


def _lead(s: Setup, entry: str, resume: Resume | None, out: Path | None, group: Group) -> dict:
    """Rank 0 (a single process is rank 0 of 1): trains, tracks in MLflow and saves."""
    cfg, meta = s.cfg, s.meta
    if group.active:
        t = cfg.train
        say(f"training in {group.world_size} process(es) (torchrun, DDP over {group.backend}); "
            f"effective batch {t.batch_size} × {group.world_size} × {t.grad_accum_steps} = "
            f"{t.batch_size * group.world_size * t.grad_accum_steps} sequences per step")
    experiment_id = tracking.setup(cfg.tracking.experiment)
    name = run_name(cfg, meta["source"])
    # the signal handlers stay in place while the run ends: a SIGTERM that torchrun sends after
    # another rank died must not cut short marking the run FAILED
    with GracefulStop() as stop, \
            runs.ended(runs.training_run(experiment_id, name, s.parent_run_id)) as run:
        tracker = runs.TrainingTracker(run, experiment_id, cfg)
        _record_run(run, s, entry, resume)
        if out is not None:  # a retry of a killed training process finds its run by it
            record_run_id(out, tracker.run_id)
        saver = TrainingSaver(cfg, meta, tracker.run_id, stop, model=s.model, optimizer=s.optimizer,
                              tok=s.tok, flush=tracker.flush, on_saved=tracker.checkpoint_saved,
                              dtype=s.dtype, group=group,
                              protect=(resume.checkpoint,) if resume else ())
        hooks = Callbacks(on_log=tracker.log, on_eval=tracker.log_eval, should_save=saver.due,
                          on_save=saver.save, should_stop=saver.stop_requested,
                          on_stop=saver.save_and_stop)
        try:
            state = train(group.wrap(s.model, s.device), s.optimizer, s.train_ids, s.val_ids,
                          cfg.train, cfg.model.block_size, s.device, hooks, s.state, dtype=s.dtype,
                          group=group)
        finally:
            saver.wait()
            tracker.flush()
        final = saver.final(state.step)
        title = cfg.tracking.run_name or run.info.run_name
        runs.log_training_artifacts(write_training_log(state, title, out))
    return {
        "run_id": tracker.run_id, "experiment_id": experiment_id, "checkpoint": str(final),
        "checkpoints": [str(p) for p in saver.saved], "checkpoint_dir": str(saver.dir),
        "step": state.step, "source": meta["source"], "model_type": cfg.model.type,
        "final_val_loss": state.last_val_loss, "final_model_id": tracker.model_ids.get(state.step),
        "model_ids": {str(step): m for step, m in tracker.model_ids.items()},  # JSON: str keys
        "n_params": s.n_params,
    }


def run_name(cfg: Config, source: str) -> str:
    """A short name that tells runs apart in the UI's lists, legends and compare headers: model and
    data, the settings that differ from params.yaml (-S, environment), and a random suffix (runs
    with equal settings differ too). E.g. 'gpt-dear_agnes lr=0.003 steps=400 ·3f2a'."""
    import secrets

    slug = variant_slug(cfg.model.variant)
    changed = [f"{key.rsplit('.', 1)[1]}={value}" for key, value in changed_settings(cfg).items()]
    shown = changed[:3] + ([f"+{len(changed) - 3}"] if len(changed) > 3 else [])
    return " ".join([f"{cfg.model.type}-{source}" + (f"-{slug}" if slug else ""), *shown,
                     f"·{secrets.token_hex(2)}"])


def changed_settings(cfg: Config) -> dict[str, object]:
    """The model-shaping settings (data, tokenizer, model, train) whose values differ from
    params.yaml's own; none when there is no valid params.yaml to compare with."""
    from lmpipe.common.errors import UserError
    from lmpipe.config import PARAMS_FILE, load_config

    try:
        base = load_config(PARAMS_FILE, env={}).flat() if Path(PARAMS_FILE).is_file() else {}
    except UserError:
        base = {}
    ignored = ("train.device", "train.resume", "data.source", "model.type")  # in the name already
    return {k: v for k, v in cfg.flat().items() if k in base and base[k] != v
            and k.split(".")[0] in ("data", "tokenizer", "model", "train") and k not in ignored}


def _record_run(run, s: Setup, entry: str, resume: Resume | None) -> None:
    """The run's resume tags, its params (a new run's only) and its lineage tags."""
    cfg, meta = s.cfg, s.meta
    if resume:  # a continued run's params are immutable: record the resume as tags
        runs.record_resume(s.state.step, resume.checkpoint, s.state.schedule.to_dict(),
                           f"{meta.get('source_spec')} ({meta.get('fingerprint')})",
                           cfg.train.nproc)
    t = cfg.train
    runs.log_run_params(run, {**cfg.flat(), "vocab_size": s.tok.vocab_size,
                              "n_params": s.n_params, "device": s.device,
                              "source_name": meta["source"], "world_size": t.nproc,
                              "effective_batch_size": t.batch_size * t.nproc * t.grad_accum_steps})
    inputs = {"data.train": meta["train"], "data.val": meta["val"],
              "tokenizer": tokenizer.TOKENIZER_FILE}
    runs.tag_run(inputs, {"lmpipe.entry": entry, "lmpipe.model_type": cfg.model.type,
                              "lmpipe.source": meta["source"]})


def write_training_log(state: TrainState, title: str = "",
                       out: Path | None = None) -> list[tuple[Path, str | None]]:
    """The training log (CSV, DVC plots) and loss-curve PNG titled `title` (the run name), in
    outputs/ or `out`; returns them with the tokenizer and stats table, each with its artifact
    folder. The PNG goes to the run's root: the UI's compare page shows only the files at the root
    that the runs share."""
    import pandas as pd

    from lmpipe.common.fileio import atomic_write_text
    from lmpipe.common.paths import LOSS_PLOT, TOKEN_STATS, TRAIN_LOG
    from lmpipe.train.plots import loss_curve

    log_path, plot = (TRAIN_LOG, LOSS_PLOT) if out is None else (out / TRAIN_LOG.name,
                                                                 out / LOSS_PLOT.name)
    log = pd.DataFrame(state.history).groupby("step", as_index=False).first()
    atomic_write_text(log_path, log.to_csv(index=False))
    loss_curve(log, plot, title)
    return [(log_path, "training"), (plot, None),
            (tokenizer.TOKENIZER_FILE, "tokenizer"), (TOKEN_STATS, "data")]
