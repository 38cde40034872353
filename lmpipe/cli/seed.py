"""The seed guide's scripts, as thin wrappers over the lmpipe commands (README: "The seed guides'
commands").

    python3 training.py                  → lmpipe run   (ENABLE_CHECKPOINTS defaults to false,
                                           as in the guide)
    python3 scripts/load_checkpoint.py   → MODE=inference: lmpipe generate;
                                           MODE=resume: lmpipe resume
    python3 training_resume.py           → lmpipe resume --source $TRAINING_DATA_SOURCE

Their environment variables, with the guide's defaults: CHECKPOINT_PATH (a path or a glob, the
newest match; or an MLflow URI, models:/NAME@champion), MODE, PROMPT (""), MAX_NEW_TOKENS
(generate.max_new_tokens: 300, as in the guide), SEED (generate.seed), DEVICE (auto),
RESUME_TRAINING_STEPS (5000), RESUME_LEARNING_RATE (3e-4; MODE=resume trains only when one of the
two is set, else it shows the plan), plus ENABLE_CHECKPOINTS, CHECKPOINT_INTERVAL, CHECKPOINT_DIR,
MODEL_TYPE, TRAINING_STEPS and TRAINING_DATA_SOURCE (lmpipe.config.ENV_VARS).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

LOAD_CHECKPOINT_HELP = ("usage: [VARIABLE=VALUE ...] python3 scripts/load_checkpoint.py   "
                        "(or ./load_checkpoint.py)") + """

  CHECKPOINT_PATH=PATH|GLOB MODE=inference [PROMPT=...] [MAX_NEW_TOKENS=300] [SEED=N] [DEVICE=auto]
      generate text (lmpipe generate); SEED draws a different sample (default: generate.seed)
  CHECKPOINT_PATH=PATH|GLOB MODE=resume
      show the checkpoint and the resume plan (from/to step, learning rate, data and its
      fingerprint, optimizer state) and the command that starts it; trains nothing
  CHECKPOINT_PATH=PATH|GLOB MODE=resume RESUME_TRAINING_STEPS=5000 RESUME_LEARNING_RATE=3e-4
      resume training (lmpipe resume --steps --lr): setting either variable starts it; the other
      takes the guide's default. TRAINING_DATA_SOURCE=PATH continues on new data.

CHECKPOINT_PATH may also name a model in MLflow: models:/NAME/VERSION, models:/NAME@ALIAS (e.g.
@champion) or runs:/RUN_ID/PATH; it is downloaded once into checkpoint.dir/.mlflow-downloads/.
A glob picks its newest match. Without TRAINING_DATA_SOURCE a resume continues on the checkpoint's
own data.
"""


def ensure_dependencies(script: str) -> None:
    """`python3 script.py` with a Python that lacks torch: re-run it with the project's .venv."""
    if importlib.util.find_spec("torch") is not None:
        return
    venv = REPO / ".venv" / "bin" / "python"
    # not already in it
    if venv.exists() and Path(sys.prefix).resolve() != venv.parent.parent.resolve():
        os.execv(str(venv), [str(venv), script, *sys.argv[1:]])
    sys.exit(f"lmpipe: error: {sys.executable} lacks lmpipe's dependencies (torch, ...); run 'make "
             "setup' to create .venv, or 'pip install -e .'")


def main(script: str) -> int:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(LOAD_CHECKPOINT_HELP if script == "load_checkpoint"
              else (sys.modules["__main__"].__doc__ or "").strip())
        return 0
    ensure_dependencies(sys.argv[0])
    from lmpipe.cli.main import guarded

    return guarded({"training": training, "load_checkpoint": load_checkpoint,
                    "training_resume": lambda: load_checkpoint(mode="resume")}[script])


def training() -> int:
    """The whole pipeline; without ENABLE_CHECKPOINTS=true only the final checkpoint is written
    (evaluation, generation and registration need it)."""
    from lmpipe.cli.main import main as lmpipe

    overrides = []
    if os.environ.get("ENABLE_CHECKPOINTS", "") == "":
        overrides = ["-S", "checkpoint.enabled=false"]
        print("lmpipe: periodic checkpoints are off (the guide's default); set "
              "ENABLE_CHECKPOINTS=true to save every CHECKPOINT_INTERVAL steps. The final "
              "checkpoint is always saved.",
              file=sys.stderr)
    return lmpipe(["run", *overrides])


def _env_number(name: str, default: str, kind: type):
    from lmpipe.common.errors import UserError

    raw = os.environ.get(name, "") or default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise UserError(f"{name} must be a positive {'integer' if kind is int else 'number'}, got "
                        f"{raw!r}; unset it to use the default ({default})")
    return value


# The variables each mode reads; the other mode's are reported as having no effect.
MODE_VARS = {"inference": ("PROMPT", "MAX_NEW_TOKENS", "SEED"),
             "resume": ("RESUME_TRAINING_STEPS", "RESUME_LEARNING_RATE", "TRAINING_DATA_SOURCE")}


def load_checkpoint(mode: str | None = None) -> int:
    """MODE=inference generates; MODE=resume shows the checkpoint and the resume plan, and trains
    only when RESUME_TRAINING_STEPS or RESUME_LEARNING_RATE is set (training_resume.py always
    trains)."""
    from lmpipe.cli.main import main as lmpipe
    from lmpipe.common.errors import UserError, warn
    from lmpipe.config import load_config
    from lmpipe.tracking.uris import is_uri, resolve

    spec = os.environ.get("CHECKPOINT_PATH", "")
    if not spec:
        raise UserError("CHECKPOINT_PATH is not set; set it to a checkpoint file or glob, e.g. "
                        "CHECKPOINT_PATH=checkpoints/checkpoint_gpt_*_step2000_*.pt (list them "
                        "with 'lmpipe ckpt list' or 'ls checkpoints/'), or to a registered "
                        "version, e.g. CHECKPOINT_PATH=models:/NAME@champion")
    script = _shown_path(sys.argv[0] or "scripts/load_checkpoint.py")
    trains = mode == "resume"  # training_resume.py always trains
    mode = mode or os.environ.get("MODE", "") or "inference"
    if mode not in MODE_VARS:
        raise UserError(f"MODE must be inference or resume, got {mode!r}")
    for var in (v for m, names in MODE_VARS.items() if m != mode for v in names):
        if os.environ.get(var):
            warn(f"{var}={os.environ[var]} has no effect with MODE={mode}; it applies to "
                 f"MODE={'resume' if mode == 'inference' else 'inference'}")
    cfg = load_config()
    path = resolve(spec, cfg.checkpoint.dir)
    if mode == "inference":
        return lmpipe(["generate", "--checkpoint", str(path), "--prompt",
                       os.environ.get("PROMPT", ""),
                       "--max-new-tokens",
                       str(_env_number("MAX_NEW_TOKENS", str(cfg.generate.max_new_tokens), int)),
                       "--seed", str(_env_seed(cfg.generate.seed)),
                       "--device", os.environ.get("DEVICE", "") or "auto"])
    return _resume(path, spec if is_uri(spec) else str(path), script, dry_run=not trains and not (
        os.environ.get("RESUME_TRAINING_STEPS") or os.environ.get("RESUME_LEARNING_RATE")))


def _resume(path: Path, spec: str, script: str, dry_run: bool) -> int:
    """The guide's resume of `path` (`spec` names it: the path, or the MLflow URI it was downloaded
    from): with neither RESUME_ variable set, only show what would happen."""
    from lmpipe.cli.main import main as lmpipe

    steps = _env_number("RESUME_TRAINING_STEPS", "5000", int)
    lr = _env_number("RESUME_LEARNING_RATE", "3e-4", float)
    _describe(path)
    source = os.environ.get("TRAINING_DATA_SOURCE", "")
    args = ["resume", "--checkpoint", spec, "--steps", str(steps), "--lr", str(lr),
            *(["--source", source] if source else [])]
    if not dry_run:
        return lmpipe(args)
    code = lmpipe([*args, "--dry-run"])
    if code == 0:
        env = (f"CHECKPOINT_PATH={spec} MODE=resume RESUME_TRAINING_STEPS={steps} "
               f"RESUME_LEARNING_RATE={lr}")
        print(f"or, as the guide: {env}{' TRAINING_DATA_SOURCE=' + source if source else ''} "
              f"python3 {script}\n(nothing was trained: MODE=resume trains only when "
              "RESUME_TRAINING_STEPS or "
              "RESUME_LEARNING_RATE is set)")
    return code


def _shown_path(path: str) -> str:
    """The script as the user can type it from here: relative below the working directory."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else os.path.abspath(path)


def _env_seed(default: int) -> int:
    """SEED: which sample to draw (any integer; the default is generate.seed)."""
    from lmpipe.common.errors import UserError

    raw = os.environ.get("SEED", "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"SEED must be an integer, got {raw!r}; unset it to use "
                        f"generate.seed ({default})") from None


def _describe(path: Path) -> None:
    """The guide's "display information about the checkpoint" before resuming."""
    from lmpipe.ckpt.store import load_checkpoint

    ckpt = load_checkpoint(path, mmap=True)
    m = ckpt["hyperparameters"]["model"]
    dims = m.get("hf_config") or m  # a pretrained GPT-2's own sizes, not params.yaml's
    arch = ", ".join(f"{k}={dims[k]}" for k in ("n_layer", "n_head",
                                                "n_embd") if k in dims and m["type"] != "bigram")
    arch += f", pretrained {m['pretrained']}" if m["type"] == "gpt2" else ""
    print(f"checkpoint {path}\n  model {ckpt['model_type']}{' (' + arch + ')' if arch else ''}, "
          f"step {ckpt['step']}, vocab_size {ckpt['vocab_size']}, block_size {ckpt['block_size']}, "
          f"batch_size {ckpt['batch_size']}, optimizer state "
          f"{'present' if ckpt.get('optimizer_state_dict') else 'absent'}",
          file=sys.stderr)
