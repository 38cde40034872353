"""`lmpipe ckpt doctor`: the recovery guide's failure classes, recognised, each with a diagnosis and
the exact command that fixes it.

not found · tensor size mismatch · corrupted · optimizer trouble · `_orig_mod.`/`module.` prefixes ·
missing tokenizer · unsafe pickle · leftovers of interrupted saves. Exit codes: 0 healthy (notes
only), 3 fixable, 4 broken.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmpipe.ckpt.inspection import Row, scan
from lmpipe.ckpt.rebuild import shape_mismatches
from lmpipe.ckpt.verify import Report, buildable_arch, check
from lmpipe.ckpt.views import View
from lmpipe.common.errors import UserError, joined

EXIT = {"healthy": 0, "fixable": 3, "broken": 4}
SEVERITY = {"note": 0, "fixable": 1, "broken": 2}
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


@dataclass
class Finding:
    severity: str  # note | fixable | broken
    title: str
    detail: list[str] = field(default_factory=list)
    fix: str | None = None


@dataclass
class Diagnosis:
    path: str
    summary: str  # "lmpipe, step 20" or what was found instead
    findings: list[Finding] = field(default_factory=list)

    @property
    def status(self) -> str:
        worst = max((SEVERITY[f.severity] for f in self.findings), default=0)
        return ("healthy", "fixable", "broken")[worst]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "summary": self.summary, "status": self.status,
                "findings": [asdict(f) for f in self.findings]}


def diagnose(path: str, model_cfg: dict[str, Any] | None = None, forced: bool = False,
             trust_pickle: bool = False) -> list[Diagnosis]:
    """One Diagnosis per checkpoint at `path` (a file, a glob, or a directory of checkpoints).
    model_cfg: the architecture the user's configuration asks for; forced: they asked explicitly.
    A manifest passed as a checkpoint is a UserError (bad usage), not a corrupted checkpoint."""
    from lmpipe.ckpt.store import refuse_manifest

    target = Path(os.path.expanduser(path))
    if any(c in path for c in "*?["):
        matches = sorted(glob.glob(str(target)), key=os.path.getmtime)
        if not matches:
            return [not_found(target)]
        target = Path(matches[-1])
    refuse_manifest(target, "pass one of them, e.g. {example}, or the directory to diagnose all")
    if not target.exists():
        return [not_found(target)]
    if target.is_dir() and not _is_single(target):
        rows = scan(target, depth=1)
        if not rows:
            return [not_found(target / "*")]
        out = [diagnose_one(Path(r.path), model_cfg, forced, trust_pickle) for r in rows]
        return out + [_directory(target, rows)]
    return [diagnose_one(target, model_cfg, forced, trust_pickle)]


def _is_single(d: Path) -> bool:
    from lmpipe.ckpt.views import hf_weight_files

    return (d / "config.json").exists() and bool(hf_weight_files(d))


def diagnose_one(path: Path, model_cfg: dict | None, forced: bool, trust_pickle: bool) -> Diagnosis:
    r = check(path, trust_pickle)
    v = r.view
    d = Diagnosis(str(path), f"{v.format}, step {v.step}" if v else "unreadable")
    for p in r.problems:
        d.findings.append(_finding_for(p.kind, p.text, r))
    if v is not None:
        d.findings += _prefixes(v) + _tokenizer(v) + _resumability(v)
        if model_cfg:
            d.findings += _size_mismatch(v, model_cfg, forced)
    return d


def _finding_for(kind: str, text: str, r: Report) -> Finding:
    path = r.path
    if kind in ("integrity", "load", "nonfinite"):
        return _fallback(kind, text, r)
    if kind == "unsafe":
        return Finding("fixable", "needs arbitrary unpickling", [text],
                       f"only if you trust its origin: lmpipe ckpt inspect {path} --trust-pickle")
    if kind == "optimizer":
        if r.view is not None and r.view.format != "lmpipe":
            return Finding("fixable", "optimizer state does not fit", [text,
                                                                       "resume without the "
                                                                       "optimizer state in the "
                                                                       "trainer that wrote it"])
        return Finding("fixable", "optimizer state does not fit", [text],
                       f"lmpipe resume --checkpoint {path} --no-optimizer --warmup 100")
    if kind == "architecture" and r.view is not None:
        from lmpipe.ckpt.views import infer_arch

        shapes = ", ".join(f"{k}={x}" for k, x in infer_arch(r.view.state).items())
        return Finding("broken", "tensor size mismatch", [text,
                                                          f"the weights themselves say {shapes}",
                                                          "the file was edited or written by "
                                                          "another program"])
    if kind == "tokenizer" or "tokenizer" in text:
        return _missing_tokenizer(path, text)
    return Finding("broken", kind, [text])


def _fallback(kind: str, text: str, r: Report) -> Finding:
    """A corrupted or diverged checkpoint: the last earlier one of its lineage that verifies."""
    from lmpipe.ckpt.store import parse_filename

    title = "corrupted" if kind != "nonfinite" else "NaN/Inf in the weights (training diverged)"
    run_id = run_id_of(r.path, r.view)
    earlier = last_good_before(r.path, run_id)
    named = parse_filename(r.path)
    if earlier is None:
        which = f"of its lineage ({_lineage(named, run_id)}) " if named else ""
        return Finding("broken", title, [text, f"no earlier checkpoint {which}verifies"],
                       "retrain: lmpipe run (or ENABLE_CHECKPOINTS=true python3 training.py)")
    row = Row("nanochat" if earlier.name.startswith("model_") else "lmpipe", "", "",
              _step_in_name(earlier.name), None, 0, None, "", "", str(earlier))
    detail = [text, f"the last verified earlier checkpoint: {earlier}"]
    if named and run_id is None:
        detail.append(UNCONFIRMED)
    return Finding("fixable", title, detail, _use_command(row))


# Said when a suggestion is an lmpipe checkpoint whose run cannot be compared.
UNCONFIRMED = ("its lineage could not be confirmed: no manifest entry records its MLflow run, so "
               "the suggestion only shares its model and source and has an earlier step")


def _lineage(named: dict, run_id: str | None) -> str:
    run = f", MLflow run {run_id}" if run_id else ""
    return f"model {named['model']}, source {named['source']}{run}"


def run_id_of(path: Path, view: View | None = None) -> str | None:
    """The MLflow run a checkpoint belongs to: its manifest entry's, else the one the file holds."""
    from lmpipe.ckpt.manifest import read_manifest

    entry = read_manifest(path.parent).get(path.name) or {}
    return entry.get("run_id") or (view.info.get("run_id") if view is not None else None) or None


def last_good_before(path: Path, run_id: str | None = None) -> Path | None:
    """The newest earlier checkpoint of the same lineage that verifies. nanochat: the same model
    tag (directory). lmpipe: the same model and source (file names) and, when `run_id` is known,
    the same MLflow run (a resume continues its run: a checkpoint `path` descends from)."""
    from lmpipe.ckpt.integrity import verify_checkpoint
    from lmpipe.ckpt.store import parse_filename
    from lmpipe.ckpt.views import NANOCHAT_RE, nanochat_steps

    if (m := NANOCHAT_RE.match(path.name)) is not None:
        for step in reversed([s for s in nanochat_steps(path.parent) if s < int(m[2])]):
            cand = path.parent / f"model_{step:06d}.pt"
            if check(cand).ok:
                return cand
        return None
    named = parse_filename(path)
    if named is None:
        return None
    for cand in _earlier_of_lineage(path, named):
        if run_id is not None and _run_of(cand) != run_id:
            continue
        if verify_checkpoint(cand, deep=True).ok:
            return cand
    return None


def _earlier_of_lineage(path: Path, named: dict) -> list[Path]:
    """lmpipe checkpoints beside `path` with its model and source at earlier steps, newest first."""
    from lmpipe.ckpt.store import list_checkpoints, parse_filename

    def same(p: Path) -> bool:
        n = parse_filename(p)
        return bool(n) and (n["model"], n["source"]) == (named["model"], named["source"]) \
            and n["step"] < named["step"]

    found = [p for p in list_checkpoints(path.parent) if p != path and same(p)]
    return sorted(found, key=lambda p: parse_filename(p)["step"], reverse=True)


def _run_of(path: Path) -> str | None:
    """A candidate's run: its manifest entry's, else the one the file holds (memory-mapped)."""
    from lmpipe.ckpt.manifest import read_manifest
    from lmpipe.ckpt.store import load_checkpoint

    entry = read_manifest(path.parent).get(path.name)
    if entry is not None:
        return entry.get("run_id")
    try:
        return load_checkpoint(path, mmap=True).get("run_id")
    except UserError:
        return None


TRAIN = "train with checkpoints: ENABLE_CHECKPOINTS=true python3 training.py (or: lmpipe run)"


def not_found(path: Path) -> Diagnosis:
    """What exists near a missing path, and the checkpoint of its lineage with the nearest step."""
    near = path.parent
    rows = scan(near, depth=1) if near.is_dir() else []
    d = Diagnosis(str(path), "not found")
    if not rows:
        where = f"no checkpoints in {near}/" if near.is_dir() else f"{near}/ does not exist"
        d.findings.append(Finding("broken", "Checkpoint not found", [where], TRAIN))
        return d
    steps = ", ".join(str(r.step) for r in rows[-12:])
    detail = [f"{near}/ holds {len(rows)} checkpoint(s); steps: {steps}"]
    pool, note = _lineage_rows(path, rows)
    if not pool:
        d.findings.append(Finding("broken", "Checkpoint not found", detail + [note], TRAIN))
        return d
    want = _step_in_name(path.name)
    best = min(pool, key=lambda r: (abs((r.step or 0) - want), (r.step or 0) > want)) \
        if want is not None else pool[-1]
    near_step = f" to step {want}" if want is not None else " (newest)"
    detail.append(f"nearest{near_step}: {best.path} (step {best.step})")
    d.findings.append(Finding("fixable", "Checkpoint not found", detail + ([note] if note else []),
                              _use_command(best)))
    return d


def _lineage_rows(path: Path, rows: list[Row]) -> tuple[list[Row], str | None]:
    """The rows a missing lmpipe checkpoint's suggestion may come from: its model and source, and
    its run if the manifest still records it (else earlier steps only); plus what to say about it.
    Other names (nanoGPT's ckpt.pt, nanochat's) carry no lineage: every row, nothing to say."""
    from lmpipe.ckpt.manifest import read_manifest
    from lmpipe.ckpt.store import parse_filename

    named = parse_filename(path)
    if named is None:
        return rows, None
    run_id = (read_manifest(path.parent).get(path.name) or {}).get("run_id")
    same = [r for r in rows if r.format == "lmpipe"
            and (r.model, r.source) == (named["model"], named["source"])]
    pool = [r for r in same if r.run_id == run_id] if run_id else \
        [r for r in same if (r.step or 0) <= named["step"]]
    if not pool:
        return [], f"none of them is of its lineage ({_lineage(named, run_id)})"
    return pool, None if run_id else UNCONFIRMED


def _step_in_name(name: str) -> int | None:
    m = re.search(r"step(\d+)", name) or re.match(r"(?:model|meta|optim)_(\d+)", name)
    return int(m[1]) if m else None


def _use_command(row: Row) -> str:
    if row.format == "nanochat":
        return (f"python -m scripts.base_train --model-tag={Path(row.path).parent.name} "
                f"--resume-from-step={row.step}")
    if row.format == "lmpipe":
        return (f"lmpipe resume --checkpoint {row.path}   "
                f"(or: lmpipe generate --checkpoint {row.path})")
    return f"lmpipe ckpt inspect {row.path}"


def _prefixes(v: View) -> list[Finding]:
    raw = v.raw.get("model_state_dict") or v.raw.get("model") if isinstance(v.raw, dict) else None
    keys = list(raw) if isinstance(raw, dict) else list(v.state)
    hit = sorted({p for k in keys for p in ("_orig_mod.", "module.") if k.startswith(p)})
    if not hit:
        return []
    fix = (f"lmpipe ckpt import {v.path}   (writes a clean lmpipe copy)"
           if v.format == "nanogpt" else None)
    return [Finding("note",
                    f"weight names carry {' and '.join(hit)} prefixes (torch.compile / DDP)",
                    ["lmpipe strips them on load and never writes them"], fix)]


def _tokenizer(v: View) -> list[Finding]:
    if v.format == "nanogpt" and v.tokenizer and v.tokenizer["kind"] == "gpt2" \
            and (v.arch.get("vocab_size") or 0) < 50257:
        ds = v.hyperparameters.get("config", {}).get("dataset", "DATASET")
        return [Finding("fixable", "missing tokenizer", [
            f"vocab_size={v.arch.get('vocab_size')} is a character vocabulary, but no meta.pkl was "
            f"found (looked beside the checkpoint and in data/{ds}/)",
            f"rebuild it with nanoGPT: python data/{ds}/prepare.py"],
            f"lmpipe ckpt import {v.path} --meta data/{ds}/meta.pkl")]
    if v.tokenizer is None and v.format in ("nanochat", "hf"):  # lmpipe: a missing key, see check()
        return [_missing_tokenizer(v.path, "no tokenizer found", v.format)]
    return []


def _missing_tokenizer(path: Path, text: str, fmt: str = "lmpipe") -> Finding:
    from lmpipe.ckpt.views import nanochat_base_dir
    from lmpipe.common.paths import TOKENIZER_FILE

    if fmt == "nanochat":
        where = nanochat_base_dir(path.parent) / "tokenizer"
        return Finding("fixable", "missing tokenizer", [text, f"nanochat looks in {where}/"],
                       "python -m scripts.tok_train   "
                       "(nanochat rebuilds it from its training data)")
    if fmt == "hf":
        return Finding("fixable", "missing tokenizer",
                       [text, f"no tokenizer.json or vocab.json in {path}"],
                       "copy tokenizer.json (or vocab.json + merges.txt) from the base model into "
                       f"{path}/")
    found = [p for p in (path.parent / "tokenizer.json", TOKENIZER_FILE) if p.is_file()]
    if found:
        return Finding("fixable", "missing tokenizer", [text, f"found a tokenizer at {found[0]}"],
                       f"lmpipe ckpt import {path} --tokenizer {found[0]}")
    return Finding("fixable", "missing tokenizer",
                   [text, "no tokenizer.json beside it or in data/tokenizer/"],
                   "lmpipe stage tokenizer (on the corpus it was trained on), then lmpipe ckpt "
                   f"import {path} --tokenizer {TOKENIZER_FILE}")


def _resumability(v: View) -> list[Finding]:
    if v.format != "lmpipe":
        return []
    if "train_state" not in v.keys:
        return [Finding("note", "no training state", ["written by an older lmpipe or imported: it "
                                                      "generates; training on starts a fresh "
                                                      "state and optimizer"],
                        f"lmpipe resume --checkpoint {v.path} --no-optimizer --warmup 100 --source "
                        "YOUR_TEXT")]
    if v.optimizer is None:
        return [Finding("note", "no optimizer state",
                        ["it can generate; resuming needs a fresh optimizer"],
                        f"lmpipe resume --checkpoint {v.path} --no-optimizer --warmup 100")]
    return []


def _size_mismatch(v: View, model_cfg: dict, forced: bool) -> list[Finding]:
    """Only when the user forces an architecture (-S model.* or MODEL_TYPE): resume and generate
    otherwise build the model from the checkpoint's own hyperparameters."""
    arch = buildable_arch(v)
    if not forced or arch is None or model_cfg.get("type") != arch["type"]:
        return []
    want = {**model_cfg, "vocab_size": arch["vocab_size"]}
    try:
        reshaped, missing, unexpected = shape_mismatches(v.state, want)
    except (TypeError, ValueError, RuntimeError):
        return []
    if not (reshaped or missing or unexpected):
        return []
    keys = [k for k in ARCH_KEYS if k in arch and k in want and arch[k] != want[k]]
    detail = [f"{k}: checkpoint {tuple(a)}, configured model {tuple(b)}" for k, a, b in reshaped]
    for names, where in ((missing, "only in the configured model"),
                         (unexpected, "only in the checkpoint")):
        if names:
            detail.append(f"{len(names)} tensor(s) {where}: "
                          f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")
    if keys:
        detail.append(f"checkpoint has {', '.join(f'{k}={arch[k]}' for k in keys)}; you asked for "
                      f"{joined([str(want[k]) for k in keys])}")
    detail.append("lmpipe resume and generate build the model from the checkpoint's own "
                  "hyperparameters")
    fix = "drop the -S model.* / MODEL_TYPE overrides, or match the checkpoint: " + \
        " ".join(f"-S model.{k}={arch[k]}" for k in keys if k != "vocab_size")
    return [Finding("fixable", "tensor size mismatch", detail, fix)]


def _directory(d: Path, rows: list[Row]) -> Diagnosis:
    """Leftovers of interrupted saves, manifest entries without a file, and free disk space."""
    from lmpipe.ckpt.manifest import read_manifest
    from lmpipe.common.fileio import stale_temporaries

    out = Diagnosis(str(d), f"directory, {len(rows)} checkpoint(s)")
    tmps = stale_temporaries(d)
    if tmps:
        out.findings.append(Finding("note", "temporaries of interrupted saves",
                                    [t.name for t in tmps[:5]],
                                    "removed when training next starts in this directory; or: rm " +
                                    " ".join(str(t) for t in tmps[:5])))
    dangling = [n for n in read_manifest(d) if not (d / n).exists()]
    if dangling:
        out.findings.append(Finding("note", "manifest entries without a file", dangling[:5],
                                    "dropped when training next starts in this directory"))
    if rows:
        biggest, free = max(r.size for r in rows), shutil.disk_usage(d).free
        if free < 2 * biggest:
            out.findings.append(Finding("fixable", "low disk space", [
                f"{free / 1e6:.0f} MB free, the largest checkpoint is {biggest / 1e6:.0f} MB"],
                "free space, or keep fewer: -S checkpoint.keep_last=2 (retention deletes older "
                "ones)"))
    return out
