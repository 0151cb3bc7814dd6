"""Torch reference of Safe Delta's two hot paths: per-block selection and the compensation sweep.

This file is the specification that the CUDA kernels in ``cuda_ext/`` are checked against, so
it favours plain, obviously-correct tensor code over speed. Both functions work on one column
block of one Linear weight, fp32, shapes ``(out, b)``; ``Hinv`` is the block's diagonal block
of ``U``, the upper Cholesky factor of the (damped) inverse Hessian (DESIGN §5.1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class BlockSelection(NamedTuple):
    """Which entries of a block keep their fine-tuned value, and what the selection costs.

    ``keep``: (out, b) bool. ``column_cost``: (b,) float64, ``Σ_i c_im`` per column.
    ``kept_cost``: () float64, ``Σ c_im`` over the kept entries (Safe Delta's first-order
    estimate of the safety cost of the block's selection, before compensation).
    """

    keep: torch.Tensor
    column_cost: torch.Tensor
    kept_cost: torch.Tensor


def select_block(
    w_finetuned: torch.Tensor,
    w: torch.Tensor,
    kappa: torch.Tensor,
    budget: float,
    exclude: float,
) -> BlockSelection:
    """Safe Delta's selection for one block (DESIGN §5.1 step 3).

    ``w_finetuned`` is W_F's block and ``w`` the working block (W_A plus the compensation of
    earlier blocks), both (out, b) fp32; ``kappa`` (b,) fp32 is ``1 / U_mm²``.

    Entry costs are ``c_im = (W_F,im − W_im)² · κ_m``. The entries are ordered by the key
    ``(κ_m, m, i)``: κ ascending, ties by column index, rows in order within a column. The last
    ``int(exclude · out · b)`` entries of that order are never kept; of the rest, the longest
    prefix whose cumulative cost is ``<= budget`` is kept.

    All rows of a column share κ, so the order is "columns by (κ, m), each column top to
    bottom" and the kept prefix is whole columns plus a top part of one more column: no sort
    over out·b entries is needed. Cumulative costs are accumulated in float64; a different
    summation order (a per-entry scan) can move the boundary by one entry only when the
    cumulative cost equals the budget to within float64 rounding.
    """
    out, b = w.shape
    cost = (w_finetuned - w).square() * kappa
    column_cost = cost.sum(dim=0, dtype=torch.float64)

    order = torch.sort(kappa, stable=True).indices
    inclusive = torch.cumsum(column_cost[order], dim=0)
    full_columns = int((inclusive <= budget).sum())
    kept = full_columns * out
    if full_columns < b:
        before = inclusive[full_columns - 1] if full_columns > 0 else inclusive.new_zeros(())
        partial = before + torch.cumsum(cost[:, order[full_columns]].double(), dim=0)
        kept += int((partial <= budget).sum())
    kept = min(kept, out * b - int(exclude * out * b))

    position = torch.empty_like(order)
    position[order] = torch.arange(b, device=order.device)
    rank = position[None, :] * out + torch.arange(out, device=order.device)[:, None]
    keep = rank < kept
    kept_cost = torch.where(keep, cost, 0.0).sum(dtype=torch.float64)
    return BlockSelection(keep, column_cost, kept_cost)


def compensate_block(
    w: torch.Tensor,
    w_finetuned: torch.Tensor,
    keep: torch.Tensor,
    Hinv: torch.Tensor,
    sub_block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Safe Delta's compensation sweep over one block (DESIGN §5.1 step 4), GPTQ-style.

    Inputs: working block ``w``, ``w_finetuned`` and ``keep`` (out, b); ``Hinv`` (b, b), the
    block's diagonal block of U. Returns ``(Q, Err)``, both (out, b) fp32: ``Q`` the block's
    final values (kept entries are exactly W_F) and ``Err`` the scaled errors; the caller
    finishes the block with ``W[:, after] -= Err @ U[block, after]``.

    Derivation (OBS, as in GPTQ/SparseGPT). Per row, the safety objective is
    ``f(w) = (w − w_A)ᵀ H (w − w_A)``: the change of the layer's output on the safety inputs
    (H = (2/N) Σ XᵀX). ``w = w_A`` is its minimum. Columns are fixed left to right; while column
    j is fixed to ``q_j``, the later columns are free and should stay at the minimiser of f given
    the fixed ones. With ``F`` = {j and later}, OBS gives that minimiser's move as
    ``−(w_j − q_j) / [H_F⁻¹]_jj · H_F⁻¹[j, F]``, and f grows by ``(w_j − q_j)² / [H_F⁻¹]_jj``.
    Row j of U is ``H_F⁻¹[j, F] / sqrt([H_F⁻¹]_jj)`` (GPTQ, Frantar et al. 2022), so with
    ``err = (w_j − q_j) / U_jj`` the move is ``−err · U[j, F]`` and f grows by ``err²``.
    Kept entries move to ``q = W_F`` and their error is spread over later columns; a dropped
    entry stays where the earlier compensation put it (``q = w``, ``err = 0``) and is final.
    Hence ``f(W_R) = Σ err²`` over the whole weight.

    Batching: inside a sub-block of ``sub_block`` columns the errors are applied column by
    column; to the rest of the block once per sub-block (one rank-``sub_block`` update); to
    the rest of the weight once per block by the caller. These lazy updates are exact, so the
    result does not depend on ``sub_block`` or the block size beyond float rounding.

    The sweep runs on transposed copies (b, out), so that column j of the block is the
    contiguous row j: two to three times faster on CPU than strided column access.
    """
    b = w.shape[1]
    W1 = w.T.contiguous()
    W_F1 = w_finetuned.T.contiguous()
    keep1 = keep.T.contiguous()
    Q1 = torch.empty_like(W1)
    Err1 = torch.empty_like(W1)
    for s0 in range(0, b, sub_block):
        s1 = min(s0 + sub_block, b)
        for j in range(s0, s1):
            q = torch.where(keep1[j], W_F1[j], W1[j])
            err = (W1[j] - q) / Hinv[j, j]
            W1[j + 1 : s1].addr_(Hinv[j, j + 1 : s1], err, alpha=-1)
            Q1[j] = q
            Err1[j] = err
        W1[s1:].addmm_(Hinv[s0:s1, s1:].T, Err1[s0:s1], alpha=-1)
    return Q1.T, Err1.T
