"""Hot-path kernels, dispatched in one place.

The torch functions in ``safedelta_ref`` are the specification. Each call here picks the CUDA
extension (built on first use by ``build``) for CUDA tensors it can take, and the reference
otherwise; Safe Delta on CPU tensors always uses the reference. RESTA's streaming step has a CPU
kernel (``cpu``, C built on first use in under a second) that gives the torch path's bits in one
pass over memory. Both compile sources from the top-level ``cuda_ext`` package (``sources``).
``DELTAFIX_KERNELS`` sets the choice:

- ``auto`` (default): the extensions when they build; if the CUDA one cannot, one warning line
  and the reference.
- ``torch``: always the reference, and no CPU kernel.
- ``cuda``: the CUDA extension must be available, else an ``OptionError``; calls it cannot take
  (CPU tensors, float64, blocks over ``cuda.COMPENSATE_MAX_COLUMNS`` columns) still use the
  reference. The CPU kernel is used as in ``auto``.

The projection methods' ``U_k (U_kᵀ δ)`` has no kernel on purpose: it is two cuBLAS matmuls
already at their roofline (``benchmarks/kernels.py`` records the numbers).
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType
from typing import Literal, cast

import torch

from deltafix.errors import OptionError
from deltafix.kernels import build, cpu, cuda, safedelta_ref
from deltafix.kernels.safedelta_ref import BlockSelection

log = logging.getLogger(__name__)

KERNELS_ENV = "DELTAFIX_KERNELS"
Mode = Literal["auto", "torch", "cuda"]
MODES: tuple[Mode, ...] = ("auto", "torch", "cuda")


def kernel_mode() -> Mode:
    """The choice in ``$DELTAFIX_KERNELS`` (default ``auto``)."""
    value = os.environ.get(KERNELS_ENV, "").strip().lower() or "auto"
    if value not in MODES:
        raise OptionError(f"{KERNELS_ENV}={value!r} is not a kernel choice; set it to auto, torch or cuda.")
    return cast(Mode, value)


@functools.cache
def _warn_fallback(reason: str) -> None:
    log.warning("deltafix CUDA kernels unavailable (%s); using the torch reference "
                "(set %s=torch to silence this)", reason, KERNELS_ENV)


def extension_for(device: torch.device) -> ModuleType | None:
    """The CUDA extension to use for tensors on ``device``, or None for the torch reference.

    Raises ``OptionError`` when ``DELTAFIX_KERNELS=cuda`` and the extension is unavailable,
    whatever the device, so a forced choice fails at once rather than silently.
    """
    mode = kernel_mode()
    if mode == "torch" or (mode == "auto" and device.type != "cuda"):
        return None
    loaded = build.load()
    if loaded.module is None:
        if mode == "cuda":
            raise OptionError(f"{KERNELS_ENV}=cuda but the CUDA kernels are unavailable: {loaded.reason}; "
                              f"unset {KERNELS_ENV} or set it to torch.")
        _warn_fallback(loaded.reason or "unknown reason")
        return None
    return loaded.module if device.type == "cuda" else None


def select_block(
    w_finetuned: torch.Tensor,
    w: torch.Tensor,
    kappa: torch.Tensor,
    budget: float,
    exclude: float,
) -> BlockSelection:
    """Safe Delta selection for one column block; see ``safedelta_ref.select_block``."""
    ext = extension_for(w.device)
    if ext is not None and cuda.supports_select(w_finetuned, w, kappa):
        return cuda.select_block(ext, w_finetuned, w, kappa, budget, exclude)
    return safedelta_ref.select_block(w_finetuned, w, kappa, budget, exclude)


def compensate_block(
    w: torch.Tensor,
    w_finetuned: torch.Tensor,
    keep: torch.Tensor,
    Hinv: torch.Tensor,
    sub_block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Safe Delta compensation sweep for one column block; see ``safedelta_ref.compensate_block``."""
    ext = extension_for(w.device)
    if ext is not None and cuda.supports_compensate(w, w_finetuned, keep, Hinv):
        return cuda.compensate_block(ext, w, w_finetuned, keep, Hinv, sub_block)
    return safedelta_ref.compensate_block(w, w_finetuned, keep, Hinv, sub_block)


def resta_stream(finetuned: torch.Tensor, aligned: torch.Tensor, unaligned: torch.Tensor | None,
                 out: torch.Tensor, scale: float) -> tuple[float, float] | None:
    """RESTA on one stretch of raw CPU inputs in one pass: ``out = F + scale (A − P)`` in ``out``'s
    dtype, returning ``(‖F − A‖², ‖R − A‖²)``; None where the CPU kernel is off, not built, or does
    not take these tensors (mixed dtypes), and the caller uses the torch path."""
    if unaligned is None or kernel_mode() == "torch":
        return None
    loaded = cpu.load()
    if loaded.reason is not None:
        _note_cpu_fallback(loaded.reason)
        return None
    return cpu.resta(finetuned, aligned, unaligned, out, scale)


@functools.cache
def _note_cpu_fallback(reason: str) -> None:
    log.info("deltafix CPU kernel unavailable (%s); RESTA streams through torch, about twice as slow", reason)


__all__ = ["KERNELS_ENV", "BlockSelection", "compensate_block", "extension_for", "kernel_mode", "resta_stream",
           "select_block"]
