"""The machine deltafix runs on: where it keeps its caches (testbed models, Hessians, file hashes,
built kernels), and the one resolution of ``--device`` / ``--dtype`` (``auto`` picks CUDA when present)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from deltafix.errors import OptionError


def cache_root() -> Path:
    """``$DELTAFIX_CACHE`` if set, else ``$XDG_CACHE_HOME/deltafix`` (default ``~/.cache/deltafix``)."""
    env = os.environ.get("DELTAFIX_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "deltafix"


def hessian_cache_dir() -> Path:
    """``<cache root>/hessians``: calibration Hessians, reused by every fine-tune of a base model."""
    return cache_root() / "hessians"


def kernel_cache_dir() -> Path:
    """``<cache root>/cuda_ext``: built CUDA extensions, one folder per build key."""
    return cache_root() / "cuda_ext"


def cpu_kernel_cache_dir() -> Path:
    """``<cache root>/cpu_ext``: the built CPU kernel library, one folder per build key."""
    return cache_root() / "cpu_ext"

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


_PROGRESS: ContextVar[bool] = ContextVar("deltafix_progress", default=False)
T = TypeVar("T")


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Show ``bar``s inside this block when ``enabled``: the command line turns them on (off with
    ``--json``) at its edge, and the long loops deep inside (calibration, the sequential solve,
    the screen) need no flag threaded through every call."""
    token = _PROGRESS.set(enabled)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def progress_shown() -> bool:
    """Whether the caller asked for progress (``progress_bars``)."""
    return _PROGRESS.get()


def bar(iterable: Iterable[T], **kwargs: Any) -> Iterable[T]:
    """``iterable`` with a tqdm bar on stderr while ``progress_bars(True)`` holds and stderr is a
    terminal (tqdm's ``disable=None``), so piped logs and ``--json`` runs stay clean."""
    return tqdm(iterable, disable=None if _PROGRESS.get() else True, leave=False, **kwargs)
