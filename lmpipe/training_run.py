"""The train stage: tokenized data + a fresh model + the loop, wired to checkpoints and MLflow."""
from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import torch

from lmpipe import checkpoint, data, tokenizer, tracking
from lmpipe.config import Config
from lmpipe.device import pick_device
from lmpipe.errors import UserError
from lmpipe.training import Callbacks, TrainState, make_optimizer, train


def encode_split(tok, path: str | Path, block_size: int, split: str) -> torch.Tensor:
    ids = torch.tensor(tok.encode(Path(path).read_text(encoding="utf-8")), dtype=torch.long)
    if len(ids) <= block_size + 1:
        raise UserError(f"{path}: the {split} split has {len(ids)} tokens, not more than one training block "
                        f"(model.block_size={block_size}); add text or lower model.block_size")
    return ids


def run_training(cfg: Config, entry: str) -> dict:
    """Train cfg.train.steps steps from scratch; return paths, the run id and final metrics."""
    import mlflow

    meta = data.load_meta()
    tok = tokenizer.load()
    device = pick_device(cfg.train.device)
    block = cfg.model.block_size
    train_ids = encode_split(tok, meta["train"], block, "train")
    val_ids = encode_split(tok, meta["val"], block, "val")

    torch.manual_seed(cfg.train.seed)
    from models import build_model

    model = build_model({**asdict(cfg.model), "vocab_size": tok.vocab_size}).to(device)
    optimizer = make_optimizer(model, cfg.train)
    n_params = sum(p.numel() for p in model.parameters())

    ckpt_dir = Path(cfg.checkpoint.dir)
    saved: list[str] = []
    experiment_id = tracking.setup(cfg.tracking.experiment)
    run_name = f"{cfg.model.type}-{meta['source']}"
    with mlflow.start_run(run_name=run_name, experiment_id=experiment_id) as run:
        run_id = run.info.run_id
        mlflow.log_params({**cfg.flat(), "vocab_size": tok.vocab_size, "n_params": n_params,
                           "device": device, "source_name": meta["source"]})
        mlflow.set_tags({**tracking.lineage_tags({"data.train": meta["train"], "data.val": meta["val"],
                                                   "tokenizer": tokenizer.TOKENIZER_FILE}),
                         "lmpipe.entry": entry, "lmpipe.model_type": cfg.model.type,
                         "lmpipe.source": meta["source"]})
        model_ids: dict[int, str] = {}

        def on_save(step: int, state: TrainState) -> None:
            path = ckpt_dir / checkpoint.checkpoint_filename(cfg.model.type, meta["source"], step)
            checkpoint.save_checkpoint(path, {
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(),
                "hyperparameters": cfg.to_dict(),
                "vocab_size": tok.vocab_size, "block_size": block, "batch_size": cfg.train.batch_size,
                "step": step, "model_type": cfg.model.type, "source": meta["source"],
                "tokenizer": tok.to_json(), "run_id": run_id,
                "metrics": {"val_loss": state.last_val_loss, "best_val_loss": state.best_val_loss},
                "versions": {"torch": str(torch.__version__), "lmpipe": _lmpipe_version()},
            })
            saved.append(str(path))
            print(f"saved checkpoint {path}", file=sys.stderr, flush=True)
            if cfg.tracking.log_checkpoints:
                model_ids[step] = tracking.log_checkpoint(
                    run_id, experiment_id, path, step, cfg.flat(), {"val_loss": state.last_val_loss})

        def should_save(step: int) -> bool:
            return cfg.checkpoint.enabled and step % cfg.checkpoint.interval == 0

        def on_eval(step: int, m: dict) -> None:
            # At a checkpoint, log_checkpoint logs val_loss linked to the checkpoint's logged model.
            if not (cfg.tracking.log_checkpoints and (should_save(step) or step == cfg.train.steps)):
                mlflow.log_metrics(m, step=step, synchronous=False)

        callbacks = Callbacks(on_log=lambda step, m: mlflow.log_metrics(m, step=step, synchronous=False),
                              on_eval=on_eval, should_save=should_save, on_save=on_save)
        state = train(model, optimizer, train_ids, val_ids, cfg.train, block, device, callbacks)
        _log_artifacts(state)
    return {
        "run_id": run_id, "experiment_id": experiment_id, "checkpoint": saved[-1], "checkpoints": saved,
        "checkpoint_dir": str(ckpt_dir), "step": state.step, "source": meta["source"],
        "model_type": cfg.model.type, "final_val_loss": state.last_val_loss,
        "final_model_id": model_ids.get(state.step), "n_params": n_params,
    }


def _log_artifacts(state: TrainState) -> None:
    """Training log (CSV, DVC plots), loss-curve PNG, tokenizer and stats table."""
    import mlflow
    import pandas as pd

    from lmpipe.fileio import atomic_write_text
    from lmpipe.plots import loss_curve
    from lmpipe.paths import LOSS_PLOT, TOKEN_STATS, TRAIN_LOG

    log = pd.DataFrame(state.history).groupby("step", as_index=False).first()
    atomic_write_text(TRAIN_LOG, log.to_csv(index=False))
    loss_curve(log, LOSS_PLOT)
    for path, where in ((TRAIN_LOG, "training"), (LOSS_PLOT, "training"),
                        (tokenizer.TOKENIZER_FILE, "tokenizer"), (TOKEN_STATS, "data")):
        if Path(path).exists():
            mlflow.log_artifact(str(path), where)


def _lmpipe_version() -> str:
    import lmpipe

    return lmpipe.__version__
