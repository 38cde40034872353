"""The train stage: tokenized data + a model (fresh, or resumed from a checkpoint) + the loop,
wired to checkpoints and MLflow."""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lmpipe import data, tokenizer, tracking
from lmpipe.ckpt.integrity import verify_checkpoint
from lmpipe.ckpt.payload import build_payload, current_val_loss
from lmpipe.ckpt.rebuild import (
    check_optimizer_state,
    model_from_checkpoint,
    tokenizer_from_checkpoint,
)
from lmpipe.ckpt.store import checkpoint_filename, load_checkpoint, parse_filename
from lmpipe.common.device import pick_device
from lmpipe.common.errors import UserError
from lmpipe.config import Config, config_from_dict
from lmpipe.train.loop import Callbacks, TrainState, make_optimizer, train
from lmpipe.train.resume import Resume, has_train_state, plan, say
from lmpipe.train.saver import Checkpointer, GracefulStop, TrainingStopped


@dataclass
class Setup:
    cfg: Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state: TrainState
    tok: object
    parent_run_id: str | None = None


def encode_split(tok, path: str | Path, block_size: int, split: str) -> torch.Tensor:
    try:
        ids = torch.tensor(tok.encode(Path(path).read_text(encoding="utf-8")), dtype=torch.long)
    except UserError as e:  # e.g. new data with characters the checkpoint's char vocabulary lacks
        raise UserError(f"{path} ({split} split): {e}") from None
    if len(ids) <= block_size + 1:
        raise UserError(f"{path}: the {split} split has {len(ids)} tokens, not more than one training block "
                        f"(model.block_size={block_size}); add text or lower model.block_size")
    return ids


def fresh_setup(cfg: Config, device: str) -> Setup:
    from models import build_model

    tok = tokenizer.load()
    torch.manual_seed(cfg.train.seed)
    model = build_model({**asdict(cfg.model), "vocab_size": tok.vocab_size}).to(device)
    return Setup(cfg, model, make_optimizer(model, cfg.train), TrainState.fresh(cfg.train), tok)


def resume_setup(cfg: Config, resume: Resume, device: str) -> Setup:
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
    state = _loop_state(ckpt, resume, cfg)
    state.schedule = schedule
    return Setup(cfg, model, optimizer, state, tokenizer_from_checkpoint(ckpt), ckpt.get("run_id"))


def _loop_state(ckpt: dict, resume: Resume, cfg: Config) -> TrainState:
    """The saved loop state and RNGs; a checkpoint without one (imported) starts a fresh state at
    its step, seeded from train.seed."""
    if has_train_state(ckpt):
        return TrainState.from_dict(ckpt["train_state"])
    torch.manual_seed(cfg.train.seed)  # dropout draws from the global generator
    say(f"{resume.checkpoint} has no training state: starting a fresh one at step {ckpt['step']}, with a new "
        f"optimizer and a {resume.warmup}-step learning-rate re-warmup")
    state = TrainState.fresh(cfg.train)
    state.step = ckpt["step"]
    return state


def data_record(cfg: Config, meta: dict) -> dict:
    """The data section of a checkpoint's hyperparameters: the settings and the fingerprint of the
    data this run really trained on (data/prepared), so a resume can find and check it again."""
    return {**asdict(cfg.data), "source": meta.get("source_spec", cfg.data.source),
            "fingerprint": meta.get("fingerprint")}


def run_training(cfg: Config, entry: str, resume: Resume | None = None) -> dict:
    """Train (from scratch, or on from a checkpoint); return paths, the run id and final metrics."""
    import mlflow

    device = pick_device(cfg.train.device)
    s = resume_setup(cfg, resume, device) if resume else fresh_setup(cfg, device)
    cfg, model, optimizer, tok = s.cfg, s.model, s.optimizer, s.tok
    meta = data.load_meta()
    block = cfg.model.block_size
    train_ids = encode_split(tok, meta["train"], block, "train")
    val_ids = encode_split(tok, meta["val"], block, "val")
    n_params = sum(p.numel() for p in model.parameters())

    ckpt_dir = Path(cfg.checkpoint.dir)
    experiment_id = tracking.setup(cfg.tracking.experiment)
    with tracking.training_run(experiment_id, f"{cfg.model.type}-{meta['source']}", s.parent_run_id) as run, \
            GracefulStop() as stop:
        run_id = run.info.run_id
        if resume:  # a continued run's params are immutable: record the resume as tags
            at = f"lmpipe.resume.step{s.state.step}"
            mlflow.set_tags({at: str(resume.checkpoint), f"{at}.schedule": str(s.state.schedule.to_dict()),
                             f"{at}.data": f"{meta.get('source_spec')} ({meta.get('fingerprint')})"})
        if not run.data.params:  # a new run (also when resuming an imported or foreign checkpoint)
            mlflow.log_params({**cfg.flat(), "vocab_size": tok.vocab_size, "n_params": n_params,
                               "device": device, "source_name": meta["source"]})
        mlflow.set_tags({**tracking.lineage_tags({"data.train": meta["train"], "data.val": meta["val"],
                                                   "tokenizer": tokenizer.TOKENIZER_FILE}),
                         "lmpipe.entry": entry, "lmpipe.model_type": cfg.model.type,
                         "lmpipe.source": meta["source"]})
        model_ids: dict[int, str] = {}
        metric_log = tracking.MetricLog(run_id)

        def on_saved(path: Path, entry: dict) -> None:  # runs on the writer thread when async
            print(f"saved checkpoint {path}", file=sys.stderr, flush=True)
            if cfg.tracking.log_checkpoints:
                model_ids[entry["step"]] = tracking.log_checkpoint(
                    run_id, experiment_id, path, entry["step"], cfg.flat(), logged_metrics(entry))

        ckpts = Checkpointer(ckpt_dir, cfg.checkpoint, run_id, on_saved=on_saved,
                             protect=(resume.checkpoint,) if resume else ())

        def payload(step: int, state: TrainState) -> dict:
            return build_payload(
                weights=model.state_dict(), optimizer=optimizer.state_dict(),
                hyperparameters={**cfg.to_dict(), "data": data_record(cfg, meta)}, tokenizer_json=tok.to_json(),
                step=step, vocab_size=tok.vocab_size, block_size=block, source=meta["source"], run_id=run_id,
                train_state=state.to_dict(), metrics=state.metrics())

        def name(step: int) -> Path:
            return ckpt_dir / checkpoint_filename(cfg.model.type, meta["source"], step)

        def save(step: int, state: TrainState, wait: bool = False) -> Path:
            # Metrics up to this step become durable with the checkpoint: after a kill, the resume
            # re-logs every later step, so the run's per-step history stays complete.
            metric_log.flush()
            path = name(step)
            ckpts.save(path, payload(step, state), wait=wait)
            return path

        def on_stop(step: int, state: TrainState) -> None:
            path = save(step, state, wait=True)
            signame = {2: "SIGINT", 15: "SIGTERM"}.get(stop.signum, f"signal {stop.signum}")
            if path not in ckpts.saved or not verify_checkpoint(path).ok:
                raise TrainingStopped(f"training stopped by {signame} at step {step}, but the emergency checkpoint "
                                      f"could not be written ({'; '.join(ckpts.failed[-1:])})", stop.signum)
            raise TrainingStopped(f"training stopped by {signame} at step {step}; saved and verified {path}\n"
                                  f"resume with: lmpipe resume --checkpoint {path}", stop.signum)

        def should_save(step: int) -> bool:
            return cfg.checkpoint.enabled and step % cfg.checkpoint.interval == 0

        def on_eval(step: int, m: dict) -> None:
            # At a checkpoint, log_checkpoint logs val_loss linked to the checkpoint's logged model.
            if not (cfg.tracking.log_checkpoints and (should_save(step) or step == s.state.schedule.end)):
                metric_log.log(step, m)

        callbacks = Callbacks(
            on_log=metric_log.log,
            on_eval=on_eval, should_save=should_save,
            on_save=lambda step, state: save(step, state),
            should_stop=lambda: stop.requested, on_stop=on_stop)
        try:
            state = train(model, optimizer, train_ids, val_ids, cfg.train, block, device, callbacks, s.state)
        finally:
            ckpts.wait()
            metric_log.flush()
        if not ckpts.saved or parse_filename(ckpts.saved[-1])["step"] != state.step:
            raise UserError(f"training finished at step {state.step}, but its final checkpoint could not be "
                            f"written ({'; '.join(ckpts.failed[-1:]) or 'unknown error'}); free disk space and "
                            "resume from the last saved checkpoint")
        _log_artifacts(state)
    return {
        "run_id": run_id, "experiment_id": experiment_id, "checkpoint": str(ckpts.saved[-1]),
        "checkpoints": [str(p) for p in ckpts.saved], "checkpoint_dir": str(ckpt_dir), "step": state.step,
        "source": meta["source"], "model_type": cfg.model.type, "final_val_loss": state.last_val_loss,
        "final_model_id": model_ids.get(state.step), "n_params": n_params,
    }


def logged_metrics(entry: dict) -> dict[str, float]:
    """The metrics a checkpoint's MLflow logged model gets: its val_loss, unless that was measured
    at an earlier step (a save on a signal): MLflow ranks logged models by it as their own."""
    val = current_val_loss(entry["metrics"], entry["step"])
    return {} if val is None else {"val_loss": val}


def _log_artifacts(state: TrainState) -> None:
    """Training log (CSV, DVC plots), loss-curve PNG, tokenizer and stats table."""
    import mlflow
    import pandas as pd

    from lmpipe.common.fileio import atomic_write_text
    from lmpipe.common.paths import LOSS_PLOT, TOKEN_STATS, TRAIN_LOG
    from lmpipe.train.plots import loss_curve

    log = pd.DataFrame(state.history).groupby("step", as_index=False).first()
    atomic_write_text(TRAIN_LOG, log.to_csv(index=False))
    loss_curve(log, LOSS_PLOT)
    for path, where in ((TRAIN_LOG, "training"), (LOSS_PLOT, "training"),
                        (tokenizer.TOKENIZER_FILE, "tokenizer"), (TOKEN_STATS, "data")):
        if Path(path).exists():
            mlflow.log_artifact(str(path), where)
