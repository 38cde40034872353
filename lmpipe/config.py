"""params.yaml → frozen, validated config objects; environment variables and `-S` overrides on top.

Precedence, strongest first: CLI `-S section.key=value` (the syntax of `dvc exp run -S`), the seed
guide's environment variables (ENV_VARS), params.yaml's `by_model` entry for the chosen model.type,
params.yaml's sections, then the defaults below.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from lmpipe.common.errors import ConfigError
from models import MODELS

PARAMS_FILE = "params.yaml"
MODEL_TYPES = tuple(MODELS)  # the model registry decides which keys exist
TOKENIZER_KINDS = ("auto", "char", "bpe", "gpt2")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")
PROMOTE_RULES = ("auto", "never", "always")  # tracking.promote


@dataclass(frozen=True)
class DataConfig:
    source: str = "dear_agnes"  # a bundled corpus name, or a .md/.txt file or a directory of them
    val_fraction: float = 0.1
    seed: int = 1337


@dataclass(frozen=True)
class TokenizerConfig:
    # auto: char for models trained from scratch, the pretrained model's own for gpt2
    kind: str = "auto"
    vocab_size: int = 512  # bpe only
    gpt2_path: str = "gpt2"  # gpt2 only: a local model directory, or a hub name when online


@dataclass(frozen=True)
class ModelConfig:
    type: str = "gpt"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = False
    n_kv_head: int = 0  # nanochat only: key/value heads (0: one per query head)
    # gpt2: the pretrained model, a hub name (found in the local Hugging Face cache) or a local
    # directory; env GPT2_MODEL_NAME
    pretrained: str = "gpt2"
    # a slug in checkpoint names (checkpoint_gpt2_<source>_<variant>_step...): set with
    # GPT2_MODEL_NAME, so that the guide's A/B globs tell the two models apart; "": none
    variant: str = ""
    # LoRA adapters through peft (params.yaml: model.lora.r, .alpha, .dropout, .target_modules)
    lora_r: int = 0  # 0: LoRA off, every weight trains
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str = ""  # comma-separated module names; "": the architecture's default


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 12
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"
    grad_accum_steps: int = 1  # micro-batches per optimizer step: batch_size × this per step
    nproc: int = 1  # training processes (torchrun, DDP); effective batch: batch × nproc × accum
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA where supported, float32 elsewhere
    # "": start fresh; "latest" or a checkpoint path: resume (explicit, tracked by DVC)
    resume: str = ""


@dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True  # periodic checkpoints; the final step is always saved
    interval: int = 500
    dir: str = "checkpoints"
    async_save: bool = True  # params.yaml key: checkpoint.async
    keep_last: int = 0  # retention: 0 keeps every checkpoint
    keep_best: int = 1  # ... plus the best K by validation loss
    keep_every: int = 0  # ... plus every M-th step as a milestone (0: none)


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 32
    max_batches: int = 0  # 0: the whole validation split


@dataclass(frozen=True)
class GenerateConfig:
    prompt: str = "Dear Agnes,"
    max_new_tokens: int = 300
    temperature: float = 0.8
    top_k: int = 0  # 0: no top-k filtering
    seed: int = 1337
    device: str = "auto"
    num_samples: int = 1

    def sampling(self) -> dict[str, Any]:
        """The settings a served model's predict takes as params (the prompt is its input): the
        registered signature's defaults, and the fallback of TextGenerator.predict."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_k": self.top_k, "seed": self.seed}


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = "lmpipe"
    register: bool = True
    model_name: str = ""  # "": lmpipe-{model}-{source}
    log_checkpoints: bool = True  # every checkpoint also becomes an MLflow logged model (a copy)
    # a new version's alias champion: auto when its eval bits per byte beat the champion's on the
    # same data; never; always
    promote: str = "auto"
    # set by the A/B flow, not in params.yaml: the training run becomes a child of this run (its
    # mlflow.parentRunId tag), under this name ("": the usual name)
    parent_run_id: str = ""
    run_name: str = ""


@dataclass(frozen=True)
class Config:
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    generate: GenerateConfig = GenerateConfig()
    tracking: TrackingConfig = TrackingConfig()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)

    def tokenizer_kind(self) -> str:
        """tokenizer.kind with auto resolved: the pretrained model's own tokenizer for gpt2, char
        for models trained from scratch."""
        if self.tokenizer.kind != "auto":
            return self.tokenizer.kind
        return "gpt2" if self.model.type == "gpt2" else "char"

    def unsupported_gradient_checkpointing(self) -> str | None:
        """Why train.gradient_checkpointing cannot apply to model.type, or None."""
        if self.train.gradient_checkpointing and self.model.type != "gpt2":
            return (f"train.gradient_checkpointing=true: model.type {self.model.type} does not "
                    "support it (only gpt2 does); set train.gradient_checkpointing=false")
        return None

    def flat(self) -> dict[str, Any]:
        """{"train.lr": 0.001, ...}: every hyperparameter under its params.yaml key."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


# The seed guide's environment variables and the keys they set.
ENV_VARS: dict[str, tuple[str, ...]] = {
    "ENABLE_CHECKPOINTS": ("checkpoint.enabled",),
    "CHECKPOINT_INTERVAL": ("checkpoint.interval",),
    "CHECKPOINT_DIR": ("checkpoint.dir",),
    "MODEL_TYPE": ("model.type",),
    "TRAINING_STEPS": ("train.steps",),
    "TRAINING_DATA_SOURCE": ("data.source",),
    "DEVICE": ("train.device", "generate.device"),
    "NPROC": ("train.nproc",),
    "GPT2_MODEL_NAME": ("model.pretrained", "model.variant"),
}


Item = tuple[str, Any, str]  # (section.key, value, where it came from)

# params.yaml's per-model defaults: by_model.<model.type>.<section>.<key>, applied over the general
# sections when model.type matches (below the environment and -S), in these sections only.
BY_MODEL = "by_model"
PER_MODEL_SECTIONS = ("model", "train")

# params.yaml keys that are not Python identifiers → the field that holds them
ALIASES = {"checkpoint.async": "checkpoint.async_save", "model.lora.r": "model.lora_r",
           "model.lora.alpha": "model.lora_alpha", "model.lora.dropout": "model.lora_dropout",
           "model.lora.target_modules": "model.lora_target_modules"}
LORA_NAMES = {v: k for k, v in ALIASES.items() if k.startswith("model.lora.")}
NESTED = {"model.lora"}  # params.yaml mappings inside a section: model: {lora: {r: 8}}


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and v > 0


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and v >= 0


def _pos_float(v: Any) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


def _nonneg_float(v: Any) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v >= 0


def _fraction(v: Any) -> bool:
    return isinstance(v, float) and 0 < v < 1


def _one_of(choices: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), "one of " + ", ".join(choices)


def _nonempty(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


POS_INT = (_pos_int, "a positive integer")
NONNEG_INT = (_nonneg_int, "an integer >= 0")
POS_FLOAT = (_pos_float, "a positive number")
NONNEG_FLOAT = (_nonneg_float, "a number >= 0")
NONEMPTY = (_nonempty, "a non-empty string")

# key → (check, what is allowed). Keys not listed only need the right type.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.source": NONEMPTY,
    "data.val_fraction": (_fraction, "a number strictly between 0 and 1"),
    "tokenizer.kind": _one_of(TOKENIZER_KINDS),
    "tokenizer.vocab_size": ((lambda v: isinstance(v, int) and v >= 257), "an integer >= 257"),
    "model.type": _one_of(MODEL_TYPES),
    "model.n_layer": POS_INT,
    "model.n_head": POS_INT,
    "model.n_embd": POS_INT,
    "model.block_size": POS_INT,
    "model.dropout": ((lambda v: isinstance(v, float) and 0 <= v < 1), "a number in [0, 1)"),
    "model.n_kv_head": NONNEG_INT,
    "model.pretrained": NONEMPTY,
    "model.lora_r": NONNEG_INT,
    "model.lora_alpha": POS_FLOAT,
    "model.lora_dropout": ((lambda v: isinstance(v, float) and 0 <= v < 1), "a number in [0, 1)"),
    "train.steps": POS_INT,
    "train.batch_size": POS_INT,
    "train.lr": POS_FLOAT,
    "train.min_lr": NONNEG_FLOAT,
    "train.warmup_steps": NONNEG_INT,
    "train.weight_decay": NONNEG_FLOAT,
    "train.beta1": ((lambda v: isinstance(v, float) and 0 <= v < 1), "a number in [0, 1)"),
    "train.beta2": ((lambda v: isinstance(v, float) and 0 <= v < 1), "a number in [0, 1)"),
    "train.grad_clip": NONNEG_FLOAT,
    "train.eval_interval": POS_INT,
    "train.eval_batches": POS_INT,
    "train.log_interval": POS_INT,
    "train.device": _one_of(DEVICES),
    "train.grad_accum_steps": POS_INT,
    "train.nproc": POS_INT,
    "train.dtype": _one_of(DTYPES),
    "checkpoint.interval": POS_INT,
    "checkpoint.dir": NONEMPTY,
    "checkpoint.keep_last": NONNEG_INT,
    "checkpoint.keep_best": NONNEG_INT,
    "checkpoint.keep_every": NONNEG_INT,
    "evaluate.batch_size": POS_INT,
    "evaluate.max_batches": NONNEG_INT,
    "generate.max_new_tokens": POS_INT,
    "generate.temperature": POS_FLOAT,
    "generate.top_k": NONNEG_INT,
    "generate.device": _one_of(DEVICES),
    "generate.num_samples": POS_INT,
    "tracking.experiment": NONEMPTY,
    "tracking.promote": _one_of(PROMOTE_RULES),
}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(value: Any, typ: str) -> Any:
    """Convert a YAML/env/CLI value to the field's type; raise ValueError if it cannot be."""
    if typ == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise ValueError("true or false")
    if typ == "int":
        if isinstance(value, bool):
            raise ValueError("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise ValueError("an integer")
    if typ == "float":
        if isinstance(value, bool):
            raise ValueError("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError("a number") from None
    return "" if value is None else str(value)


def parse_assignment(text: str) -> tuple[str, str]:
    """'train.lr=3e-4' → ('train.lr', '3e-4')."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError([f"override {text!r} must look like section.key=value (e.g. "
                           "train.steps=100)"])
    return key.strip(), value.strip()


def _sections() -> dict[str, dict[str, str]]:
    """{section: {key: type name}} from the dataclasses above."""
    return {
        f.name: {g.name: str(g.type) for g in fields(f.default)}  # type: ignore[arg-type]
        for f in fields(Config)
    }


def load_config(
    params_file: str | Path | None = PARAMS_FILE,
    overrides: list[str] | tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Config:
    """Build the validated Config. Collects every problem before raising one ConfigError."""
    env = os.environ if env is None else env
    problems: list[str] = []
    params = _read_params(params_file, problems)
    per_model = _by_model_items(params.pop(BY_MODEL, None), str(params_file), problems)
    cli, cli_per_model = _override_items(overrides, problems)
    per_model += cli_per_model
    layers = [_params_items(params, str(params_file), problems), _env_items(env), cli]
    model_type = _model_type(layers)
    layers.insert(1, [item for t, item in per_model if t == model_type])  # weakest first

    raw: dict[str, dict[str, Any]] = {s: {} for s in _sections()}
    origin: dict[str, str] = {}
    for key, value, where in (item for layer in layers for item in layer):
        key = ALIASES.get(key, key)
        if _known_key(key, where, _sections(), problems):
            section, _, name = key.partition(".")
            raw[section][name] = value
            origin[key] = where
    cfg = _build(raw, origin, problems)
    for t, (key, value, where) in per_model:  # the other model types' values: the same rules
        if t != model_type:
            section, _, name = key.partition(".")
            _check(key, value, _sections()[section][name], where, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _model_type(layers: list[list[Item]]) -> str:
    """model.type as the strongest layer sets it: it picks the by_model entry that applies."""
    for key, value, _ in reversed([item for layer in layers for item in layer]):
        if key == "model.type":
            return _coerce(value, "str")
    return ModelConfig.type


def _override_items(overrides, problems: list[str]) -> tuple[list[Item], list[tuple[str, Item]]]:
    """-S section.key=value items, and -S by_model.TYPE.SECTION.KEY=value ones apart."""
    items, per_model = [], []
    for text in overrides:
        try:
            key, value = parse_assignment(text)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        if key.startswith(BY_MODEL + "."):
            per_model += _by_model_override(text, key, value, problems)
        else:
            items.append((key, value, "-S"))  # raw text: each field's type decides how to read it
    return items, per_model


def _known_key(key: str, where: str, known: dict[str, dict[str, str]], problems: list[str],
               prefix: str = "") -> bool:
    """Is `key` (section.name) one of `known`? If not, say so, naming the keys that exist."""
    section, _, name = key.partition(".")
    if section not in known:
        problems.append(f"{where}: unknown section {prefix + section!r}; known: {', '.join(known)}")
    elif name not in known[section]:
        problems.append(f"{where}: unknown key {prefix + key!r}; "
                        f"keys in {prefix + section}: {', '.join(known[section])}")
    else:
        return True
    return False


def _params_items(params: dict[str, Any], where: str, problems: list[str]) -> list[Item]:
    items = []
    for section, values in params.items():
        if not isinstance(values, dict):
            problems.append(f"{where}: section {section!r} must be a mapping, got {values!r}")
            continue
        items += [item for name, value in values.items()
                  for item in _nested(f"{section}.{name}", value, where)]
    return items


def _nested(key: str, value: Any, where: str) -> list[Item]:
    """model: {lora: {r: 8}} → model.lora.r; a list value (target_modules) → comma-separated."""
    if key in NESTED and isinstance(value, dict):
        return [item for k, v in value.items() for item in _nested(f"{key}.{k}", v, where)]
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return [(key, value, where)]


def _env_items(env: dict[str, str]) -> list[Item]:
    return [(key, env[var], f"environment variable {var}")
            for var, keys in ENV_VARS.items() if env.get(var, "") != "" for key in keys]


def _per_model_keys() -> dict[str, dict[str, str]]:
    """What by_model may set: model and train keys, model.type aside. DVC tracks by_model as a
    param of the train stage only, so another stage's setting there would change unnoticed."""
    known = _sections()
    return {s: {k: t for k, t in known[s].items() if (s, k) != ("model", "type")}
            for s in PER_MODEL_SECTIONS}


def _by_model_items(table: Any, where: str, problems: list[str]) -> list[tuple[str, Item]]:
    """params.yaml's by_model → [(model type, (section.key, value, where))], each key checked."""
    if table is None:
        return []
    if not isinstance(table, dict):
        problems.append(f"{where}: {BY_MODEL} must be a mapping of model types, got {table!r}")
        return []
    items = []
    for model_type, sections in table.items():
        if not isinstance(sections, dict):
            problems.append(f"{where}: {BY_MODEL}.{model_type} must be a mapping of sections, got "
                            f"{sections!r}")
            continue
        for section, values in sections.items():
            if not isinstance(values, dict):
                problems.append(f"{where}: {BY_MODEL}.{model_type}.{section} must be a mapping, "
                                f"got {values!r}")
                continue
            items += _by_model_item(str(model_type), section, values.items(), where, problems)
    return items


def _by_model_override(text: str, key: str, value: str,
                       problems: list[str]) -> list[tuple[str, Item]]:
    """-S by_model.TYPE.SECTION.KEY=value → the same items as params.yaml's by_model gives."""
    parts = key.split(".")
    if len(parts) != 4:
        problems.append(f"override {text!r} must look like {BY_MODEL}.TYPE.SECTION.KEY=value "
                        f"(e.g. {BY_MODEL}.bigram.train.lr=0.1)")
        return []
    return _by_model_item(parts[1], parts[2], [(parts[3], value)], "-S", problems)


def _by_model_item(model_type: str, section: str, values, where: str,
                   problems: list[str]) -> list[tuple[str, Item]]:
    """One by_model.TYPE.SECTION mapping's (key, value) pairs as items; unknown names are
    problems."""
    if model_type not in MODEL_TYPES:
        problems.append(f"{where}: unknown model type {model_type!r} in {BY_MODEL}; "
                        f"known: {', '.join(MODEL_TYPES)}")
        return []
    prefix = f"{BY_MODEL}.{model_type}."
    return [(model_type, (f"{section}.{name}", value, f"{where} {prefix[:-1]}"))
            for name, value in values
            if _known_key(f"{section}.{name}", where, _per_model_keys(), problems, prefix)]


def _read_params(params_file: str | Path | None, problems: list[str]) -> dict[str, Any]:
    if params_file is None or not Path(params_file).exists():
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        problems.append(f"{params_file}: not valid YAML ({str(e).splitlines()[0]}); fix the syntax")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{params_file}: must be a mapping of sections, got {type(data).__name__}")
        return {}
    return data


_INVALID = object()  # a value that cannot be read as its field's type


def _check(key: str, value: Any, typ: str, where: str, problems: list[str]) -> Any:
    """`value` read as the field's type and checked against RULES; each problem is one line naming
    the key, the value, where it came from and what is allowed. _INVALID if it cannot be read."""
    name = LORA_NAMES.get(key, key)  # as params.yaml and -S spell it
    try:
        value = _coerce(value, typ)
    except ValueError as e:
        problems.append(f"{name} must be {e}, got {value!r} (from {where})")
        return _INVALID
    check = RULES.get(key)
    if check and not check[0](value):
        problems.append(f"{name} must be {check[1]}, got {value!r} (from {where})")
    return value


def _build(raw: dict[str, dict[str, Any]], origin: dict[str, str], problems: list[str]) -> Config:
    sections = {}
    for f in fields(Config):
        values = {}
        for g in fields(f.default):  # type: ignore[arg-type]
            key = f"{f.name}.{g.name}"
            value = _check(key, raw[f.name].get(g.name, getattr(f.default, g.name)), str(g.type),
                           origin.get(key, "defaults"), problems)
            if value is not _INVALID:
                values[g.name] = value
        sections[f.name] = type(f.default)(**{**asdict(f.default), **values})
    cfg = Config(**sections)
    m = cfg.model
    bad = {p.split(" ", 1)[0] for p in problems}
    if not {"model.n_embd", "model.n_head"} & bad and m.n_embd % m.n_head:
        problems.append(f"model.n_embd must be divisible by model.n_head, got n_embd={m.n_embd}, "
                        f"n_head={m.n_head}")
    if not {"model.n_head", "model.n_kv_head"} & bad and m.n_kv_head and m.n_head % m.n_kv_head:
        problems.append("model.n_head must be divisible by model.n_kv_head, got "
                        f"n_head={m.n_head}, n_kv_head={m.n_kv_head}")
    if not {"train.lr", "train.min_lr"} & bad and cfg.train.min_lr > cfg.train.lr:
        problems.append(f"train.min_lr must be <= train.lr, got min_lr={cfg.train.min_lr}, "
                        f"lr={cfg.train.lr}")
    return cfg


def config_from_dict(d: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a Config from Config.to_dict() output (e.g. a checkpoint's hyperparameters).

    Unknown keys are dropped and missing ones take defaults, so older checkpoints still load.
    """
    sections = {}
    for f in fields(Config):
        known = {g.name for g in fields(f.default)}  # type: ignore[arg-type]
        given = {k: v for k, v in (d.get(f.name) or {}).items() if k in known}
        sections[f.name] = type(f.default)(**{**asdict(f.default), **given})
    return Config(**sections)


# --- settings that do nothing in a configuration -------------------------------------------------

# Environment variables that belong to features of other configurations (not settings of their own).
OTHER_ENV_VARS: dict[str, str] = {}


def _inert_reason(key: str, cfg: Config) -> str | None:
    """Why `key` has no effect under `cfg`, or None when it has one."""
    section, name = key.split(".", 1)
    if section == BY_MODEL and name.split(".", 1)[0] != cfg.model.type:
        return (f"model.type is {cfg.model.type}; it applies when model.type is "
                f"{name.split('.', 1)[0]}")
    if key == "tokenizer.vocab_size" and cfg.tokenizer_kind() != "bpe":
        return f"tokenizer.kind is {cfg.tokenizer_kind()}; it sizes the bpe tokenizer only"
    if key == "tokenizer.gpt2_path" and cfg.tokenizer_kind() != "gpt2":
        return f"tokenizer.kind is {cfg.tokenizer_kind()}; it locates the gpt2 tokenizer only"
    if section == "model" and name not in ("type", "block_size") and cfg.model.type == "bigram":
        return "model.type is bigram, a lookup table with no layers, heads or embeddings to size"
    if key in ("model.pretrained", "model.variant") and cfg.model.type != "gpt2" \
            and not cfg.model.lora_r:
        return (f"model.type is {cfg.model.type}; it chooses the pretrained model for "
                "MODEL_TYPE=gpt2")
    if key == "model.n_kv_head" and cfg.model.type != "nanochat":
        return f"model.type is {cfg.model.type}; it sets nanochat's key/value heads only"
    if key in ("model.dropout", "model.bias") and cfg.model.type == "nanochat":
        return "model.type is nanochat, which has neither dropout nor biases"
    if key == "checkpoint.interval" and not cfg.checkpoint.enabled:
        return ("periodic checkpoints are off (checkpoint.enabled false; ENABLE_CHECKPOINTS=true "
                "turns them on)")
    return None


def explicit_settings(overrides=(), env=None) -> dict[str, str]:
    """{key: where it was set} for the keys set on the command line or by an environment
    variable."""
    env = os.environ if env is None else env
    found = {k: f"environment variable {var}" for var,
             keys in ENV_VARS.items() if env.get(var, "") != ""
             for k in keys}
    for text in overrides:
        key = ALIASES.get(text.partition("=")[0].strip(), text.partition("=")[0].strip())
        found[key] = "-S"
    return found


def inert_settings(cfg: Config, overrides=(), env=None) -> list[str]:
    """One warning line for each explicitly set variable or key that does nothing under `cfg`."""
    env = os.environ if env is None else env
    lines = [f"{var}={env[var]} has no effect: {why}" for var,
             why in OTHER_ENV_VARS.items() if env.get(var)]
    for key, where in explicit_settings(overrides, env).items():
        why = _inert_reason(key, cfg) if "." in key else None
        var = where.removeprefix("environment variable ")
        if why and var != where and len(ENV_VARS[var]) > 1:  # one line for the variable
            line = f"{var}={env[var]} has no effect: {why}"
            lines += [] if line in lines else [line]
        elif why:
            lines.append(f"{key} (from {where}) has no effect: {why}")
    return lines
