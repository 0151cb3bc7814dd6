"""The CPU streaming kernel (``resta_cpu.c`` in the top-level ``cuda_ext`` package, found by
``sources``): compiled with the system C compiler on first use, called through ctypes.

The source is plain C with no torch headers, so a build takes under a second. The library is cached
under ``<deltafix cache>/cpu_ext/<key>/``. The key hashes the source, the flags, the compiler's
identity and the machine type, so an entry is never reused for a different build. A build writes to
a temporary name and renames it, so concurrent processes never load a half-written library. x86-64
builds carry clones for AVX-512, AVX2 and baseline CPUs, so a cached library suits any x86-64 CPU.

Nothing here raises when the kernel cannot be had (no compiler, a failed build): ``load()`` says
why, and callers use the torch path, which gives the same bits.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltafix.kernels import sources
from deltafix.kernels.build import first_line
from deltafix.env import cpu_kernel_cache_dir

log = logging.getLogger(__name__)

SOURCE = "resta_cpu.c"
"""The source's name in the kernel source folder (``sources.source_dir()``)."""
FLAGS = ("-O3", "-std=c11", "-fopenmp-simd", "-shared", "-fPIC")
LIBRARY = "deltafix_cpu.so"
SYMBOLS = {torch.float32: "deltafix_resta_f32", torch.bfloat16: "deltafix_resta_bf16",
           torch.float16: "deltafix_resta_f16"}
"""The kernel for each dtype; fp16 exists where the compiler has ``_Float16``."""
BUILD_TIMEOUT_S = 120
_BUILDING = threading.Lock()
"""The stream's worker threads ask for the kernel at once: one builds, the others wait and load it."""


@dataclass(frozen=True)
class CpuKernels:
    """The outcome of loading: a kernel per dtype it was built for, else ``reason`` why there are none."""

    functions: dict[torch.dtype, Any] = field(default_factory=dict)
    reason: str | None = None
    library: Path | None = None


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` if set, else the first of cc, gcc, clang on PATH."""
    env = shlex.split(os.environ.get("CC", ""))
    for command in ([env] if env else [["cc"], ["gcc"], ["clang"]]):
        found = shutil.which(command[0])
        if found:
            return [found, *command[1:]]
    return None


def build_key(cc: list[str]) -> str:
    """sha256 over the source, flags, compiler identity and machine (first 16 hex digits).

    Raises ``FileNotFoundError`` when the source is missing (``load`` reports it)."""
    identity = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S).stdout
    digest = hashlib.sha256(sources.source_file(SOURCE).read_bytes())
    for part in (" ".join(FLAGS), " ".join(cc), identity.strip(), platform.machine()):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def _compile(cc: list[str], library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_name(f".{library.name}.{os.getpid()}.tmp")
    try:
        subprocess.run([*cc, *FLAGS, "-o", str(partial), str(sources.source_file(SOURCE)), "-lm"],
                       capture_output=True, text=True, check=True, timeout=BUILD_TIMEOUT_S)
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)


def _bind(library: Path) -> dict[torch.dtype, Any]:
    lib = ctypes.CDLL(str(library))
    functions = {}
    for dtype, symbol in SYMBOLS.items():
        function = getattr(lib, symbol, None)
        if function is not None:
            function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_float, ctypes.c_void_p]
            function.restype = None
            functions[dtype] = function
    return functions


@functools.cache
def load() -> CpuKernels:
    """The kernels for this process: loaded from the cache, else built once; never raises."""
    cc = compiler()
    if cc is None:
        return CpuKernels(reason="no C compiler found (install gcc or clang, or set CC)")
    with _BUILDING:
        try:
            library = cpu_kernel_cache_dir() / build_key(cc) / LIBRARY
            if not library.is_file():
                log.info("building the deltafix CPU kernel in %s (under a second)", library.parent)
                _compile(cc, library)
            return CpuKernels(_bind(library), None, library)
        except (OSError, subprocess.SubprocessError) as err:
            return CpuKernels(reason=f"the build failed ({first_line(err)})")


def takes(*tensors: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors: on the CPU, one dtype, the same number of elements,
    contiguous and aligned to their element size (C may assume both; a safetensors file whose
    header is not padded can place a tensor at any byte)."""
    first = tensors[0]
    return all(t.device.type == "cpu" and t.dtype == first.dtype and t.numel() == first.numel()
               and t.is_contiguous() and t.data_ptr() % t.element_size() == 0 for t in tensors)


def resta(finetuned: torch.Tensor, aligned: torch.Tensor, unaligned: torch.Tensor, out: torch.Tensor,
          scale: float) -> tuple[float, float] | None:
    """``out = F + scale (A − P)`` in one pass, and ``(‖F − A‖², ‖R − A‖²)`` with R before rounding
    to ``out``'s dtype; None when the kernel is not built or does not take these tensors."""
    function = load().functions.get(out.dtype)
    if function is None or not takes(finetuned, aligned, unaligned, out):
        return None
    norms = (ctypes.c_double * 2)()
    function(finetuned.data_ptr(), aligned.data_ptr(), unaligned.data_ptr(), out.data_ptr(), out.numel(), scale,
             norms)
    return norms[0], norms[1]


def report_line() -> str:
    """One line for ``python -m deltafix.kernels``: where the kernel is, or why there is none."""
    loaded = load()
    if loaded.reason is not None:
        return f"deltafix CPU kernel not built: {loaded.reason}; RESTA streams through torch"
    return f"deltafix CPU kernel ready in {loaded.library}"
