"""Where deltafix keeps its caches (testbed models, Hessians, file hashes, built kernels)."""

from __future__ import annotations

import os
from pathlib import Path


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
