"""Hot-path kernels, dispatched in one place.

The torch functions in ``safedelta_ref`` are the specification. This module is the single point
where a faster implementation (``cuda_ext`` on CUDA tensors, once built) will be chosen; until
then every call goes to the reference.
"""

from __future__ import annotations

import torch

from deltafix.kernels import safedelta_ref
from deltafix.kernels.safedelta_ref import BlockSelection


def select_block(
    w_finetuned: torch.Tensor,
    w: torch.Tensor,
    kappa: torch.Tensor,
    budget: float,
    exclude: float,
) -> BlockSelection:
    """Safe Delta selection for one column block; see ``safedelta_ref.select_block``."""
    return safedelta_ref.select_block(w_finetuned, w, kappa, budget, exclude)


def compensate_block(
    w: torch.Tensor,
    w_finetuned: torch.Tensor,
    keep: torch.Tensor,
    Hinv: torch.Tensor,
    sub_block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Safe Delta compensation sweep for one column block; see ``safedelta_ref.compensate_block``."""
    return safedelta_ref.compensate_block(w, w_finetuned, keep, Hinv, sub_block)


__all__ = ["BlockSelection", "compensate_block", "select_block"]
