"""Hot-path kernels, dispatched in one place.

The torch functions in ``safedelta_ref`` are the specification. Each call here picks the CUDA
extension (``csrc/``, built on first use by ``build``) for CUDA tensors it can take, and the
reference otherwise; CPU tensors always use the reference. ``DELTAFIX_KERNELS`` sets the choice:

- ``auto`` (default): the extension when it builds; if it cannot, one warning line and the
  reference.
- ``torch``: always the reference.
- ``cuda``: the extension must be available, else an ``OptionError``; calls it cannot take
  (CPU tensors, float64, blocks over ``cuda.COMPENSATE_MAX_COLUMNS`` columns) still use the
  reference.

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
from deltafix.kernels import build, cuda, safedelta_ref
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


__all__ = ["KERNELS_ENV", "BlockSelection", "compensate_block", "extension_for", "kernel_mode", "select_block"]
