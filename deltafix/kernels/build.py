"""Build and load the optional CUDA extension (sources in the top-level ``cuda_ext`` package, found by
``sources``) with torch's JIT C++ extension loader.

The extension is compiled with ninja and nvcc on first use and cached under
``<deltafix cache>/cuda_ext/<key>/``; the key names everything the binary depends on (torch and
CUDA versions, Python version, GPU architectures, a hash of the sources and flags), so an entry
is never reused for a different build. A cached library is imported directly, without ninja or
nvcc. Ahead of time (e.g. while building a container image on a GPU machine):

    python -m deltafix.kernels          # or: deltafix doctor

Nothing here raises when the extension cannot be had: ``load()`` returns why, and the dispatch
in ``deltafix.kernels`` falls back to the torch reference.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from deltafix.env import kernel_cache_dir
from deltafix.kernels import sources

log = logging.getLogger(__name__)

EXTENSION_NAME = "deltafix_cuda_ext"
SOURCES = ("binding.cpp", "safedelta.cu")
HEADERS = ("safedelta_kernels.cuh",)
CUDA_FLAGS = ("-O3", "--expt-relaxed-constexpr")


@dataclass(frozen=True)
class Extension:
    """The outcome of loading the extension: ``module`` when it loaded, else ``reason`` why not."""

    module: ModuleType | None
    reason: str | None
    build_dir: Path | None
    detail: str | None = None  # the full build error (compiler output), when there was one


def source_hash() -> str:
    """sha256 over the sources, headers and compiler flags (first 16 hex digits).

    Raises ``FileNotFoundError`` when a source is missing (``load`` reports it)."""
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode())
        digest.update(sources.source_file(name).read_bytes())
    digest.update(" ".join(CUDA_FLAGS).encode())
    return digest.hexdigest()[:16]


def target_architectures() -> str:
    """The GPU architectures compiled for: ``$TORCH_CUDA_ARCH_LIST``, else the visible devices'."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env.replace(" ", "").replace(";", "-").replace("+", "p")
    capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return "-".join(f"sm{major}{minor}" for major, minor in capabilities) or "none"


def build_key() -> str:
    """Folder name of this build, e.g. ``torch2.5.1-cu12.4-py311-sm90-<hash>``."""
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    torch_version = torch.__version__.replace("+", "_")
    return f"torch{torch_version}-cu{torch.version.cuda}-{python}-{target_architectures()}-{source_hash()}"


def build_dir() -> Path:
    return kernel_cache_dir() / build_key()


def unavailable_reason() -> str | None:
    """Why the extension cannot be built on this machine, from cheap checks; None if it may be."""
    if torch.version.cuda is None:
        return f"this torch build has no CUDA support: torch {torch.__version__}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    try:
        from torch.utils import cpp_extension
    except ImportError as err:
        return f"torch's C++ extension builder cannot be imported ({err})"
    if cpp_extension.CUDA_HOME is None:
        return "nvcc was not found (install the CUDA toolkit or set CUDA_HOME)"
    if not cpp_extension.is_ninja_available():
        return "ninja was not found (pip install ninja)"
    return None


def _import_built(folder: Path) -> ModuleType | None:
    """Import a library built earlier into ``folder``; None if there is none or it does not import."""
    library = folder / f"{EXTENSION_NAME}{'.pyd' if os.name == 'nt' else '.so'}"
    if not library.is_file():
        return None
    spec = importlib.util.spec_from_file_location(EXTENSION_NAME, library)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as err:
        log.info("rebuilding the CUDA extension: the cached library does not import (%s)", err)
        return None
    return module


def _compile(folder: Path) -> ModuleType:
    from torch.utils import cpp_extension

    folder.mkdir(parents=True, exist_ok=True)
    log.info("building the deltafix CUDA extension in %s (first use; about a minute)", folder)
    return cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(sources.source_file(name)) for name in SOURCES],
        extra_include_paths=[str(sources.source_dir())],
        extra_cuda_cflags=list(CUDA_FLAGS),
        build_directory=str(folder),
    )


def first_line(err: BaseException) -> str:
    """``Type: first line`` of a build error; for a failed compiler run, of what it printed."""
    text = str(getattr(err, "stderr", None) or err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


@functools.cache
def load() -> Extension:
    """The extension for this process: imported from the cache, else built once; never raises.

    The outcome is remembered, so a failed build is not retried in the same process.
    """
    reason = unavailable_reason()
    if reason is not None:
        return Extension(None, reason, None)
    try:
        folder = build_dir()
    except OSError as err:
        return Extension(None, str(err), None)
    module = _import_built(folder)
    if module is not None:
        return Extension(module, None, folder)
    try:
        module = _compile(folder)
    except (RuntimeError, OSError, ImportError, ValueError, subprocess.SubprocessError) as err:
        return Extension(None, f"the build failed in {folder} ({first_line(err)})", folder, str(err))
    return Extension(module, None, folder)


def main() -> int:
    """``python -m deltafix.kernels``: build (or find) the extension and say where it is."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extension = load()
    if extension.module is None:
        print(f"deltafix CUDA extension not built: {extension.reason}", file=sys.stderr)
        if extension.detail:
            print(extension.detail, file=sys.stderr)
        return 1
    print(f"deltafix CUDA extension ready in {extension.build_dir}")
    return 0
