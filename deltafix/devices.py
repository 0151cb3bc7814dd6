"""Device and dtype choices from the command line (``auto`` picks CUDA when present)."""

from __future__ import annotations

import os

import torch

from deltafix.errors import OptionError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("--device cuda was asked for but this torch sees no CUDA device; use --device cpu.")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise OptionError(f"unknown device {name!r}; use auto, cpu or cuda.") from err


def resolve_dtype(name: str) -> torch.dtype | None:
    """``auto`` keeps each tensor's dtype from F (None); otherwise the named floating dtype."""
    if name == "auto":
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise OptionError(f"unknown dtype {name!r}; use auto, float32, float16 or bfloat16.") from None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
