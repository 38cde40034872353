"""The seed guide's scripts, as thin wrappers over the lmpipe commands (README: "The seed guides' commands").

    python3 training.py                  → lmpipe run   (ENABLE_CHECKPOINTS defaults to false, as in the guide)
    python3 scripts/load_checkpoint.py   → MODE=inference: lmpipe generate; MODE=resume: lmpipe resume
    python3 training_resume.py           → lmpipe resume --source $TRAINING_DATA_SOURCE

Their environment variables, with the guide's defaults: CHECKPOINT_PATH (a path or a glob; the newest
match), MODE, PROMPT (""), MAX_NEW_TOKENS (300), DEVICE (auto), RESUME_TRAINING_STEPS (5000),
RESUME_LEARNING_RATE (3e-4), plus ENABLE_CHECKPOINTS, CHECKPOINT_INTERVAL, CHECKPOINT_DIR, MODEL_TYPE,
TRAINING_STEPS and TRAINING_DATA_SOURCE (lmpipe.config.ENV_VARS).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def ensure_dependencies(script: str) -> None:
    """`python3 script.py` with a Python that lacks torch: re-run it with the project's .venv."""
    if importlib.util.find_spec("torch") is not None:
        return
    venv = REPO / ".venv" / "bin" / "python"
    if venv.exists() and Path(sys.prefix).resolve() != venv.parent.parent.resolve():  # not already in it
        os.execv(str(venv), [str(venv), script, *sys.argv[1:]])
    sys.exit(f"lmpipe: error: {sys.executable} lacks lmpipe's dependencies (torch, ...); run 'make setup' "
             "to create .venv, or 'pip install -e .'")


def main(script: str) -> int:
    ensure_dependencies(sys.argv[0])
    from lmpipe.cli import guarded

    return guarded({"training": training, "load_checkpoint": load_checkpoint,
                    "training_resume": lambda: load_checkpoint(mode="resume")}[script])


def training() -> int:
    """The whole pipeline; without ENABLE_CHECKPOINTS=true only the final checkpoint is written
    (evaluation, generation and registration need it)."""
    from lmpipe.cli import main as lmpipe

    overrides = []
    if os.environ.get("ENABLE_CHECKPOINTS", "") == "":
        overrides = ["-S", "checkpoint.enabled=false"]
        print("lmpipe: periodic checkpoints are off (the guide's default); set ENABLE_CHECKPOINTS=true "
              "to save every CHECKPOINT_INTERVAL steps. The final checkpoint is always saved.", file=sys.stderr)
    return lmpipe(["run", *overrides])


def _env_number(name: str, default: str, kind: type):
    from lmpipe.errors import UserError

    raw = os.environ.get(name, "") or default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise UserError(f"{name} must be a positive {'integer' if kind is int else 'number'}, got {raw!r}; "
                        f"unset it to use the default ({default})")
    return value


def load_checkpoint(mode: str | None = None) -> int:
    from lmpipe.checkpoint import resolve_checkpoint
    from lmpipe.cli import main as lmpipe
    from lmpipe.config import load_config
    from lmpipe.errors import UserError

    spec = os.environ.get("CHECKPOINT_PATH", "")
    if not spec:
        raise UserError("CHECKPOINT_PATH is not set; set it to a checkpoint file or glob, e.g. "
                        "CHECKPOINT_PATH=checkpoints/checkpoint_gpt_*_step2000_*.pt (list them with "
                        "'lmpipe ckpt list' or 'ls checkpoints/')")
    mode = mode or os.environ.get("MODE", "") or "inference"
    if mode not in ("inference", "resume"):
        raise UserError(f"MODE must be inference or resume, got {mode!r}")
    cfg = load_config()
    path = resolve_checkpoint(spec, cfg.checkpoint.dir)
    if mode == "inference":
        tokens = _env_number("MAX_NEW_TOKENS", "300", int)
        return lmpipe(["generate", "--checkpoint", str(path), "--prompt", os.environ.get("PROMPT", ""),
                       "--max-new-tokens", str(tokens), "--device", os.environ.get("DEVICE", "") or "auto"])
    steps = _env_number("RESUME_TRAINING_STEPS", "5000", int)
    lr = _env_number("RESUME_LEARNING_RATE", "3e-4", float)
    _describe(path)
    source = os.environ.get("TRAINING_DATA_SOURCE", "")
    return lmpipe(["resume", "--checkpoint", str(path), "--steps", str(steps), "--lr", str(lr),
                   *(["--source", source] if source else [])])


def _describe(path: Path) -> None:
    """The guide's "display information about the checkpoint" before resuming."""
    from lmpipe.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, mmap=True)
    m = ckpt["hyperparameters"]["model"]
    arch = ", ".join(f"{k}={m[k]}" for k in ("n_layer", "n_head", "n_embd") if k in m and m["type"] != "bigram")
    print(f"checkpoint {path}\n  model {ckpt['model_type']}{' (' + arch + ')' if arch else ''}, step {ckpt['step']}, "
          f"vocab_size {ckpt['vocab_size']}, block_size {ckpt['block_size']}, batch_size {ckpt['batch_size']}, "
          f"optimizer state {'present' if ckpt.get('optimizer_state_dict') else 'absent'}", file=sys.stderr)
