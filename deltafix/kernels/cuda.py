"""Safe Delta's hot paths on CUDA tensors: the extension's kernels plus torch for the small steps.

``select_block``: the extension sums the entry costs per column in one pass over W_F and W
(nothing of shape (out, b) is materialised); the κ order, the cumulative sums and the cut are
torch ops on (b,) vectors and on the single column that is cut, with the reference's own
expressions, so the selection is the reference's. ``compensate_block``: one kernel launch per
block. Both return what their ``safedelta_ref`` namesakes return.
"""

from __future__ import annotations

from types import ModuleType

import torch

from deltafix.kernels.safedelta_ref import BlockSelection

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Weight dtypes the kernels read; other dtypes go to the reference."""

COMPENSATE_MAX_COLUMNS = 8192
"""Widest block the sweep kernel takes: one row of it must fit in a thread block's shared memory."""


def _on_one_cuda_device(*tensors: torch.Tensor) -> bool:
    device = tensors[0].device
    return device.type == "cuda" and all(t.device == device for t in tensors)


def supports_select(w_finetuned: torch.Tensor, w: torch.Tensor, kappa: torch.Tensor) -> bool:
    """Whether ``column_cost`` takes these block inputs (else the caller uses the reference)."""
    return (
        _on_one_cuda_device(w, w_finetuned, kappa)
        and w.dim() == 2
        and w.numel() > 0
        and w_finetuned.shape == w.shape
        and w.dtype in KERNEL_DTYPES
        and w_finetuned.dtype in KERNEL_DTYPES
        and kappa.dtype == torch.float32
        and kappa.shape == (w.shape[1],)
    )


def supports_compensate(
    w: torch.Tensor, w_finetuned: torch.Tensor, keep: torch.Tensor, Hinv: torch.Tensor
) -> bool:
    """Whether ``compensate`` takes these block inputs (else the caller uses the reference)."""
    return (
        _on_one_cuda_device(w, w_finetuned, keep, Hinv)
        and w.dim() == 2
        and w.numel() > 0
        and w.shape[1] <= COMPENSATE_MAX_COLUMNS
        and w.dtype == torch.float32
        and w_finetuned.dtype in KERNEL_DTYPES
        and keep.dtype == torch.bool
        and Hinv.dtype == torch.float32
        and w_finetuned.shape == w.shape == keep.shape
        and Hinv.shape == (w.shape[1], w.shape[1])
    )


def entry_costs(w_finetuned: torch.Tensor, w: torch.Tensor, kappa: torch.Tensor, m: int) -> torch.Tensor:
    """Costs ``c_im`` of column m, (out,) fp32, by the reference's expression and so its rounding.

    ``kappa[m : m + 1]`` stays a 1-D tensor so that torch promotes a bf16/fp16 square to fp32
    exactly as it does for the whole block (a 0-D κ would keep the half dtype).
    """
    return (w_finetuned[:, m] - w[:, m]).square() * kappa[m : m + 1]


def select_from_column_cost(
    w_finetuned: torch.Tensor,
    w: torch.Tensor,
    kappa: torch.Tensor,
    budget: float,
    exclude: float,
    column_cost: torch.Tensor,
) -> BlockSelection:
    """``safedelta_ref.select_block`` given the per-column cost sums ``column_cost`` (b,) float64.

    The kept entries are the first ``kept`` of the (κ, m, i) order, so ``keep`` is built as
    "column rank < whole, or column rank == whole and row < rest" with ``(whole, rest) =
    divmod(kept, out)``, without the reference's (out, b) rank matrix. ``kept_cost`` sums the
    whole columns' costs and the cut column's top entries (same value, float64 rounding aside).
    """
    out, b = w.shape
    order = torch.sort(kappa, stable=True).indices
    inclusive = torch.cumsum(column_cost[order], dim=0)
    full_columns = int((inclusive <= budget).sum())
    kept = full_columns * out
    if full_columns < b:
        before = inclusive[full_columns - 1] if full_columns > 0 else inclusive.new_zeros(())
        cut = entry_costs(w_finetuned, w, kappa, int(order[full_columns]))
        kept += int((before + torch.cumsum(cut.double(), dim=0) <= budget).sum())
    kept = min(kept, out * b - int(exclude * out * b))

    whole, rest = divmod(kept, out)
    position = torch.empty_like(order)
    position[order] = torch.arange(b, device=order.device)
    rows_kept = (position < whole) * out + (position == whole) * rest
    keep = torch.arange(out, device=w.device)[:, None] < rows_kept
    kept_cost = column_cost[order[:whole]].sum()
    if rest > 0:
        kept_cost = kept_cost + entry_costs(w_finetuned, w, kappa, int(order[whole]))[:rest].double().sum()
    return BlockSelection(keep, column_cost, kept_cost)


def select_block(
    ext: ModuleType,
    w_finetuned: torch.Tensor,
    w: torch.Tensor,
    kappa: torch.Tensor,
    budget: float,
    exclude: float,
) -> BlockSelection:
    """Safe Delta selection for one block on CUDA; see ``safedelta_ref.select_block``."""
    column_cost = ext.column_cost(w_finetuned, w, kappa)
    return select_from_column_cost(w_finetuned, w, kappa, budget, exclude, column_cost)


def compensate_block(
    ext: ModuleType,
    w: torch.Tensor,
    w_finetuned: torch.Tensor,
    keep: torch.Tensor,
    Hinv: torch.Tensor,
    sub_block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Safe Delta compensation sweep for one block on CUDA; see ``safedelta_ref.compensate_block``.

    Returns contiguous (out, b) fp32 ``(Q, Err)``. The kernel fixes columns one by one inside
    sub-blocks of ``min(sub_block, 32)`` columns and applies each sub-block's errors to the rest
    of the block at once, like the reference; the results agree with it to float rounding.
    """
    q, err = ext.compensate(w, w_finetuned, keep, Hinv, sub_block)
    return q, err
