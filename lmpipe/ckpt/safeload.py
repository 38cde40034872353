"""Loading checkpoint files that may come from anywhere without running code stored in them.

`torch.load(weights_only=True)` rebuilds only tensors and plain containers. A file that needs
anything else (a class, a function: what a malicious pickle uses to run code) is refused with an
explanation, and loads only when the user passes --trust-pickle. Plain pickles (nanoGPT's meta.pkl)
go through an unpickler that allows no globals at all.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from lmpipe.common.errors import UserError

TRUST_HINT = ("if you trust where the file came from, the 'lmpipe ckpt' commands (inspect, "
              "verify, import) load it with --trust-pickle")


class UnsafePickle(UserError):
    """The file needs arbitrary unpickling (it names a class or function to call)."""


class Unreadable(UserError):
    """The file is truncated, corrupted or not a torch file."""


def torch_load(path: str | Path, trust_pickle: bool = False, mmap: bool = True,
               map_location: str = "cpu") -> Any:
    """torch.load with weights_only=True; mmap=True maps tensors instead of reading them, so
    metadata-only uses stay cheap for any file size."""
    import torch

    path = Path(path)
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as e:
            # files in torch's legacy (non-zip) format cannot be mapped
            if not (mmap and "mmap" in str(e)):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        needs = _needed_global(e)
        if needs is None:
            raise Unreadable(f"{path}: cannot be unpickled ({reason(e)})") from None
        if not trust_pickle:
            raise UnsafePickle(f"{path}: refused to load: the file needs arbitrary unpickling (it "
                               f"references {needs}), and unpickling can run code stored in it; "
                               f"{TRUST_HINT}") from None
    # torch raises many types on damaged files (RuntimeError, struct.error, ...)
    except Exception as e:
        raise Unreadable(f"{path}: not a complete torch file ({reason(e)})") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # --trust-pickle: whatever the file needs may be missing here
        raise Unreadable(f"{path}: could not be unpickled even with --trust-pickle "
                         f"({reason(e)})") from None


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def pickle_load(path: str | Path, trust_pickle: bool = False) -> Any:
    """A plain pickle of dicts, lists, strings and numbers; anything that names a global is
    refused."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return (pickle.Unpickler if trust_pickle else _NoGlobals)(f).load()
        except pickle.UnpicklingError as e:
            needs = _needed_global(e)
            if needs and not trust_pickle:
                raise UnsafePickle(f"{path}: refused to load: the pickle references {needs}, and "
                                   f"unpickling can run code stored in it; {TRUST_HINT}") from None
            raise Unreadable(f"{path}: cannot be unpickled ({reason(e)})") from None
        except Exception as e:
            raise Unreadable(f"{path}: cannot be unpickled ({reason(e)})") from None


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: it only keeps the state it is given
    (name, pat_str, mergeable_ranks, special_tokens), so nothing from the file is ever called."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _TiktokenOnly(_NoGlobals):
    def find_class(self, module: str, name: str):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        return super().find_class(module, name)


def tiktoken_state(path: str | Path) -> dict[str, Any]:
    """The data of a pickled tiktoken Encoding (nanochat's tokenizer.pkl), read without tiktoken and
    without running anything from the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            enc = _TiktokenOnly(f).load()
    except pickle.UnpicklingError as e:
        needs = _needed_global(e) or "something else"
        raise UnsafePickle(f"{path}: refused to load: expected a pickled tiktoken Encoding, but "
                           f"the pickle references {needs}") from None
    except Exception as e:
        raise Unreadable(f"{path}: cannot be unpickled ({reason(e)})") from None
    state = getattr(enc, "state", None)
    if not isinstance(state, dict) or not {"pat_str", "mergeable_ranks"} <= set(state):
        raise Unreadable(f"{path}: not a pickled tiktoken Encoding with its merge ranks (a "
                         "registered encoding pickled by name cannot be read offline)")
    return state


def _needed_global(e: BaseException) -> str | None:
    """The class or function a refused pickle names; None when the file is simply not a pickle."""
    m = re.search(r"GLOBAL\s+([\w.]+)|Unsupported class\s+([\w.]+)|global[:\s]+([\w.]+\.\w+)",
                  str(e))
    return next(g for g in m.groups() if g) if m else None


def reason(e: BaseException) -> str:
    """The informative sentence of a torch.load error (weights_only errors bury it mid-message)."""
    noise = ("Weights only load failed", "Please file an issue", "Check the documentation",
             "In PyTorch")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "unsupported" in ln.lower() and not ln.startswith(noise)] or \
        [ln for ln in lines if not ln.startswith(noise)] or [type(e).__name__]
    return re.sub(r"\x1b\[[0-9;]*m", "", useful[0]).split(". ")[0][:200]
