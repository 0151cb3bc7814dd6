"""What this machine offers deltafix: torch and CUDA, devices, the kernels, the cache folders.

``deltafix doctor`` prints this. It builds the CUDA extension when it can (the first time takes
about a minute) and the CPU kernel (under a second), so that it reports whether the kernels really
load and, if not, why; it never fails because they do not. It imports nothing heavy, so it works
on a half-broken install.
"""

from __future__ import annotations

import platform
from typing import Any

import torch

from deltafix import __version__, kernels
from deltafix.errors import OptionError
from deltafix.kernels import build, cpu, sources
from deltafix.env import cache_root, cpu_kernel_cache_dir, hessian_cache_dir, kernel_cache_dir

HOT_PATHS = ("safedelta_select", "safedelta_compensate", "projection_apply")
PROJECTION_NOTE = "two cuBLAS matmuls, at their roofline; no kernel by design"


def _devices() -> list[dict[str, Any]]:
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append({
            "index": i,
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
        })
    return devices


def _kernel_choice(extension: build.Extension) -> tuple[str, str, str]:
    """(mode, implementation for CUDA tensors: cuda|torch|error, why)."""
    try:
        mode = kernels.kernel_mode()
    except OptionError as err:
        return "invalid", "error", str(err)
    if mode == "torch":
        return mode, "torch", f"{kernels.KERNELS_ENV}=torch"
    if extension.module is not None:
        return mode, "cuda", "the CUDA extension is loaded"
    reason = extension.reason or "unknown reason"
    if mode == "cuda":
        return mode, "error", f"{kernels.KERNELS_ENV}=cuda but the CUDA kernels are unavailable: {reason}"
    return mode, "torch", reason


def _cpu_kernel(mode: str) -> dict[str, Any]:
    """The CPU kernel's state, and what RESTA's stream runs on (cpu|torch)."""
    if mode == "torch":
        return {"loaded": False, "reason": f"{kernels.KERNELS_ENV}=torch", "library": None, "resta_stream": "torch"}
    loaded = cpu.load()
    return {"loaded": loaded.reason is None, "reason": loaded.reason,
            "library": str(loaded.library) if loaded.library else None,
            "resta_stream": "torch" if loaded.reason else "cpu"}


def _sources() -> dict[str, Any]:
    """Where the kernel sources were found (``dir``) and which are missing there, so a wheel or
    checkout that lacks them shows it directly rather than as a failed build."""
    names = [*build.SOURCES, *build.HEADERS, cpu.SOURCE]
    try:
        folder = sources.source_dir()
    except FileNotFoundError as err:
        return {"dir": None, "missing": names, "reason": str(err)}
    missing = [name for name in names if not (folder / name).is_file()]
    return {"dir": str(folder), "missing": missing,
            "reason": f"missing from {folder}: {', '.join(missing)}" if missing else None}


def diagnose() -> dict[str, Any]:
    """The doctor's findings as plain data (the ``--json`` output)."""
    extension = build.load()
    mode, implementation, why = _kernel_choice(extension)
    return {
        "deltafix": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": _devices(),
        "kernels": {
            "mode": mode,
            "sources": _sources(),
            "extension": {
                "loaded": extension.module is not None,
                "reason": extension.reason,
                "build_dir": str(extension.build_dir) if extension.build_dir else None,
            },
            "hot_paths": {
                "safedelta_select": implementation,
                "safedelta_compensate": implementation,
                "projection_apply": "torch",
            },
            "why": why,
            "cpu_tensors": "torch",
            "cpu_kernel": _cpu_kernel(mode),
        },
        "caches": {
            "deltafix": str(cache_root()),
            "hessians": str(hessian_cache_dir()),
            "kernels": str(kernel_cache_dir()),
            "cpu_kernels": str(cpu_kernel_cache_dir()),
        },
    }


def summary(report: dict[str, Any]) -> str:
    """The human-readable form of ``diagnose()``."""
    k = report["kernels"]
    ext = k["extension"]
    lines = [f"deltafix {report['deltafix']}, Python {report['python']}, torch {report['torch']} "
             f"(CUDA {report['torch_cuda'] or 'none'})"]
    if report["devices"]:
        lines += [f"cuda:{d['index']}  {d['name']}, compute capability {d['capability']}, "
                  f"{d['memory_bytes'] / 2**30:.1f} GiB" for d in report["devices"]]
    else:
        lines.append("no CUDA device visible: everything runs on the CPU")
    src = k["sources"]
    lines.append(f"kernel sources: {src['dir']}" if src["reason"] is None
                 else f"kernel sources: unusable: {src['reason']}")
    lines.append(f"CUDA extension: loaded from {ext['build_dir']}" if ext["loaded"]
                 else f"CUDA extension: not available: {ext['reason']}")
    lines.append(f"kernel choice ({kernels.KERNELS_ENV}): {k['mode']}")
    lines.append("hot paths on CUDA tensors (on CPU tensors Safe Delta uses the torch reference):")
    for name in HOT_PATHS:
        impl = k["hot_paths"][name]
        why = PROJECTION_NOTE if name == "projection_apply" else k["why"]
        lines.append(f"  {name:<22} {impl}  ({why})")
    c = k["cpu_kernel"]
    lines.append(f"CPU kernel (RESTA's stream, one pass): loaded from {c['library']}" if c["loaded"]
                 else f"CPU kernel (RESTA's stream): not used: {c['reason']}; RESTA streams through torch")
    lines.append("caches:")
    lines += [f"  {name:<11} {path}" for name, path in report["caches"].items()]
    return "\n".join(lines)
