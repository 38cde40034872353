"""`lmpipe ckpt verify`: everything that must hold for a checkpoint to be trusted, one problem per
line.

Integrity (size and sha256 against the manifest; without an entry, and for other trainers' files,
every zip record against its CRC-32), loadability with weights_only, completeness, weights that fit
the architecture the checkpoint declares, NaN/Inf in any tensor, and optimizer state that matches
the parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpipe.ckpt.rebuild import shape_mismatches
from lmpipe.ckpt.safeload import UnsafePickle
from lmpipe.ckpt.selfcheck import Verification, self_check
from lmpipe.ckpt.views import View, open_view
from lmpipe.common.errors import UserError
from models import MODELS


@dataclass
class Problem:
    # integrity | unsafe | load | incomplete | architecture | tokenizer | nonfinite | optimizer
    kind: str
    text: str


@dataclass
class Report:
    path: Path
    view: View | None = None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def kinds(self) -> set[str]:
        return {p.kind for p in self.problems}


def check(path: str | Path, trust_pickle: bool = False) -> Report:
    path = Path(path).expanduser()
    r = Report(path)
    if path.is_file() and not _intact(path, r):
        return r
    if trust_pickle:  # still report that the file fails the weights_only load
        try:
            open_view(path)
        except UnsafePickle as e:
            r.problems.append(Problem("unsafe", f"{e} (checked further because of --trust-pickle)"))
        except UserError:
            pass
    try:
        r.view = open_view(path, trust_pickle)
    except UnsafePickle as e:
        r.problems.append(Problem("unsafe", str(e)))
        return r
    except UserError as e:
        r.problems.append(Problem("load", str(e)))
        return r
    if not all(_intact(f, r) for f in r.view.files if f != path and f.suffix in (".pt", ".bin")):
        return r  # another file of the checkpoint (nanochat's optimizer shards, a .bin) is damaged
    if _is_lora(r.view):
        r.problems += _completeness(r.view) + _nonfinite(r.view) + _lora(r.view)
        return r
    misfit = _architecture(r.view)
    r.problems += _completeness(r.view) + misfit + _nonfinite(r.view) + _optimizer(r.view,
                                                                                   exact=not misfit)
    return r


def _is_lora(v: View) -> bool:
    return v.format == "lmpipe" and isinstance(v.raw, dict) and bool(v.raw.get("base_model"))


def _lora(v: View) -> list[Problem]:
    """A LoRA checkpoint: its base (found, the one it was trained on), adapter tensors that fit it,
    optimizer state that fits the adapters."""
    import torch

    from lmpipe.ckpt.lora import BaseProblem, lora_model_from_checkpoint
    from lmpipe.ckpt.rebuild import check_optimizer_state
    from models import param_groups

    try:
        model = lora_model_from_checkpoint(v.raw, what=str(v.path))
    except UserError as e:
        return [Problem("base" if isinstance(e, BaseProblem) else "architecture",
                        str(e).removeprefix(f"{v.path}: "))]
    if not v.optimizer:
        return []
    try:
        check_optimizer_state(v.raw, torch.optim.AdamW(param_groups(model, 0.0)), v.path)
    except UserError as e:
        return [Problem("optimizer", str(e).removeprefix(f"{v.path}: "))]
    return []


def _intact(path: Path, r: Report) -> bool:
    """The file's own integrity: lmpipe's against the manifest (else its zip CRC-32s), other
    trainers' against their zip CRC-32s. A problem or a note goes into `r`."""
    from lmpipe.ckpt.integrity import verify_checkpoint

    lmpipe = path.name.startswith("checkpoint_")
    v: Verification = verify_checkpoint(path) if lmpipe else self_check(path)
    if v.status in ("corrupt", "missing"):
        r.problems.append(Problem("integrity", v.detail))
        return False
    if v.status == "unverified" and lmpipe:
        r.notes.append(f"{v.detail}: integrity cannot be checked, only loadability")
    elif v.ok and v.detail and lmpipe:  # no manifest entry: say what vouched for it
        r.notes.append(v.detail)
    return True


def _completeness(v: View) -> list[Problem]:
    from lmpipe.ckpt.payload import REQUIRED_KEYS

    out = []
    if v.format == "lmpipe":
        missing = [k for k in REQUIRED_KEYS if k not in v.keys]
        if missing:
            out.append(Problem("incomplete",
                               f"missing {', '.join(missing)} (not written by this lmpipe)"))
    if v.format == "nanochat" and v.info.get("missing_meta"):
        out.append(Problem("incomplete",
                           f"meta_{v.step:06d}.json is missing: the model config is unknown"))
    tok = v.tokenizer
    if tok and tok.get("problem"):
        out.append(Problem("tokenizer", tok["problem"]))
    elif tok and v.format == "lmpipe" and (tok.get("vocab_size") or 0) > (v.arch.get("vocab_size")
                                                                          or 0):
        out.append(Problem("tokenizer", f"tokenizer has {tok.get('vocab_size')} tokens, the model "
                                        f"{v.arch.get('vocab_size')}"))
    return out


def buildable_arch(v: View) -> dict[str, Any] | None:
    arch = dict(v.arch)
    # the registry: what lmpipe can build
    if arch.get("type") not in MODELS or not arch.get("vocab_size"):
        return None
    if arch["type"] != "bigram" and not all(arch.get(k) for k in ("n_layer", "n_head", "n_embd",
                                                                  "block_size")):
        return None
    return arch


def _architecture(v: View) -> list[Problem]:
    arch = buildable_arch(v)
    if arch is None or v.format not in ("lmpipe", "nanogpt"):
        return []
    try:
        reshaped, missing, unexpected = shape_mismatches(v.state, arch)
    except (TypeError, ValueError, RuntimeError) as e:
        return [Problem("architecture",
                        f"its hyperparameters do not build a {arch['type']} model ({e})")]
    lines = [f"{k}: checkpoint {tuple(a)}, model {tuple(b)}" for k, a, b in reshaped]
    lines += [f"{k}: missing" for k in missing[:5]] + [f"{k}: not in the model" for k
                                                       in unexpected[:5]]
    return [Problem("architecture",
                    "weights do not fit the architecture it declares: " + "; ".join(lines[:6]))] \
        if lines else []


def _nonfinite(v: View) -> list[Problem]:
    bad = [name for name, t in _float_tensors(v.state) if not _finite(t)]
    opt_bad = [name for name, t in _optimizer_tensors(v.optimizer) if not _finite(t)]
    out = []
    if bad:
        out.append(Problem("nonfinite",
                           f"NaN or Inf in {len(bad)} weight tensor(s): {', '.join(bad[:5])}"))
    if opt_bad:
        out.append(Problem("optimizer", f"NaN or Inf in optimizer state: {', '.join(opt_bad[:5])}"))
    return out


def _finite(t) -> bool:
    import torch

    return bool(torch.isfinite(t).all())


def _float_tensors(state: Any):
    import torch

    for name in state:
        t = state[name]
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            yield name, t


def _optimizer_tensors(opt: Any):
    for i, o in enumerate(opt if isinstance(opt, list) else [opt] if opt else []):
        for idx, st in ((o or {}).get("state") or {}).items() if isinstance(o, dict) else ():
            for key, t in _float_tensors(st):
                yield f"{'' if not isinstance(opt, list) else f'[{i}]'}param {idx} {key}", t


def _optimizer(v: View, exact: bool = True) -> list[Problem]:
    """lmpipe and nanoGPT order parameters the same way (matrices, then vectors): check each one
    (unless the weights already misfit the architecture). Other formats: the shapes of their
    state."""
    # nanochat shards state across ranks: shapes differ
    if not v.optimizer or v.format == "nanochat":
        return []
    arch = buildable_arch(v)
    if arch is not None and v.format in ("lmpipe", "nanogpt") and isinstance(v.optimizer, dict):
        return _exact_optimizer_check(v, arch) if exact else []
    import torch

    shapes = {tuple(t.shape) for _, t in _float_tensors(v.state)}
    out = []
    for i, o in enumerate(v.optimizer if isinstance(v.optimizer, list) else [v.optimizer]):
        if not isinstance(o, dict) or "param_groups" not in o:
            continue
        for idx, st in (o.get("state") or {}).items():
            odd = [k for k,
                   t in st.items() if isinstance(t,
                                                 torch.Tensor) and t.dim() > 0
                   and tuple(t.shape) not in shapes]
            if odd:
                out.append(Problem("optimizer",
                                   f"optimizer {i} state {odd[0]} of parameter {idx} has shape "
                                                f"{tuple(st[odd[0]].shape)}, which no weight "
                                                "tensor has"))
                break
    return out


def _exact_optimizer_check(v: View, arch: dict) -> list[Problem]:
    from lmpipe.ckpt.rebuild import check_optimizer_fits

    try:
        check_optimizer_fits(v.optimizer, arch, v.path)
    except UserError as e:
        return [Problem("optimizer", str(e).removeprefix(f"{v.path}: "))]
    return []
