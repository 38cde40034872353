"""The resume flow: train on from a checkpoint, as `lmpipe resume` does (deployment
lmpipe-resume/default)."""
from __future__ import annotations

from prefect import flow

from flows.guard import guarded
from lmpipe.config import load_config
from tasks.resume import resume_training


@flow(name="lmpipe-resume")
@guarded
def resume(checkpoint: str = "latest", steps: int | None = None, lr: float | None = None,
           source: str | None = None, no_optimizer: bool = False,
           overrides: list[str] | None = None, params_file: str = "params.yaml") -> dict:
    """Resume training from a checkpoint; returns the MLflow run id and checkpoint paths.

    Args:
        checkpoint: 'latest' (the newest checkpoint in checkpoint.dir that verifies), a path or a
            glob
        steps: train this many more steps past the checkpoint (default: to the run's planned total)
        lr: restart the learning-rate decay from this peak
        source: continue on new data (a .md/.txt file or directory)
        no_optimizer: start a fresh optimizer, with a learning-rate re-warmup
        overrides: params.yaml settings as section.key=value, as `lmpipe resume -S` takes them
        params_file: the parameters file, relative to the project directory
    """
    overrides = overrides or []
    config = load_config(params_file, overrides).to_dict()
    return resume_training(config, checkpoint, steps=steps, lr=lr, source=source,
                           no_optimizer=no_optimizer, overrides=overrides)
