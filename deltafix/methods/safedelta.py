"""Safe Delta (Lu et al., ICML 2025): keep the fine-tune delta where it is cheap for safety.

Per Linear weight (out, in), with H the (in, in) Gram of the aligned layer's inputs on the safety
data (DESIGN §5.1):

1. Dead inputs (``H_mm = 0``) get ``H_mm = 1``; damp ``H += damp · mean(diag H) · I``;
   ``Hinv`` = upper Cholesky factor U of ``H⁻¹``.
2. Sweep column blocks of ``block`` left to right on ``W = W_A``. In each block,
   ``κ_m = 1 / U_mm²`` and the budget is ``ε_b = (s/2) · (out/4096) · mean_b(κ)``.
3. Select the kept entries (``kernels.select_block``), move them to W_F and compensate the
   later columns (``kernels.compensate_block``), then apply the block's errors to the rest.

Dead-input columns are left as they are: GPTQ zeroes them (the calibration cannot see them and
zero quantises exactly), but here that would erase aligned weights the model uses on other
inputs. With ``H_mm = 1`` such a column is decoupled from the others and selected by its cost
``δ² · (1 + λ)`` like any other, as in the reference implementation.

Compensation is the exact OBS/GPTQ sweep: inside a sub-block the columns are fixed one by one,
so ``sub_block`` changes speed only. The reference implementation instead applies a sub-block's
errors only to the columns after it, skipping the coupling between the columns of one sub-block;
the two coincide for ``sub_block = 1``. Ties in κ, left to the sort in the reference, are
broken by column index here (see ``kernels.safedelta_ref.select_block``).

The budget normaliser: ``out/4096`` is Llama-7B's hidden size, and ``s/2`` is the reference's
share of ``s`` per 2048-column block of a 4096-wide input. Both are kept for fidelity, so
``scale`` has its published meaning (0.11 harmful-only, 0.10 mixed) for Llama-7B-like shapes
with ``block = 2048``; other shapes or block sizes change the effective budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field

from deltafix import kernels
from deltafix.errors import InputError, OptionError
from deltafix.methods.registry import AutoTuneParams, Method, Repaired, TuneSpec, WeightTensors, register
from deltafix.methods.stats import delta_norms

BUDGET_HIDDEN_SIZE = 4096
"""Llama-7B's hidden size: the reference's normaliser of the per-block budget (``out/4096``)."""


class SafeDeltaParams(AutoTuneParams):
    scale: Annotated[float, Field(ge=0.0)] | Literal["auto"] = Field(
        0.1,
        description="s: safety budget (0.11 harmful-only fine-tunes, 0.10 mixed); "
        "'auto' = the largest s meeting target_asr on the tune prompts.",
    )
    damp: float = Field(0.01, ge=0.0, description="Hessian damping, as a fraction of mean(diag H).")
    block: int = Field(2048, ge=1, description="columns per selection block.")
    sub_block: int = Field(4, ge=1, description="columns per compensation sub-block (speed only).")
    exclude: float = Field(
        0.15, ge=0.0, lt=1.0, description="share of each block's most sensitive entries never kept."
    )
    other_params: Literal["aligned", "finetuned"] = Field(
        "aligned", description="value of tensors that are not decoder-layer Linear weights."
    )


@dataclass
class SafeDeltaResult:
    """Safe Delta's answer for one Linear.

    ``weight``: (out, in) fp32 W_R. ``keep``: (out, in) bool, entries set to W_F.
    ``kept_cost``: Σ of the selection costs ``c_im`` of the kept entries (the paper's estimate,
    before compensation). ``est_safety_cost``: ``Σ_rows (w_R − w_A)ᵀ H (w_R − w_A)`` with the
    damped H, i.e. the change of the layer's output on the safety inputs after compensation
    (computed exactly as ``Σ Err²`` of the sweep).
    """

    weight: torch.Tensor
    keep: torch.Tensor
    kept_cost: float
    est_safety_cost: float

    @property
    def kept_fraction(self) -> float:
        return self.keep.float().mean().item()


def damped_hessian(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H (in, in) with dead inputs set to 1 on the diagonal and ``damp · mean(diag H)`` added; fp32 copy."""
    H = H.to(torch.float32, copy=True)
    diag = H.diagonal()
    diag[diag == 0] = 1.0
    diag.add_(damp * diag.mean())
    return H


def hessian_inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``Hinv``: the upper Cholesky factor U of ``damped_hessian(H, damp)⁻¹``, (in, in) fp32.

    This depends on A and the safety data only, so the pipeline may cache it per Linear.
    """
    L, info = torch.linalg.cholesky_ex(damped_hessian(H, damp))
    if info.item() == 0:
        Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if info.item() == 0:
            return Hinv
    if not bool(torch.isfinite(H).all()):  # no damping repairs NaN/Inf: say where it comes from
        raise InputError("a safety Hessian contains NaN or Inf: the aligned model's activations on the safety data "
                         "overflow; check that model's weights.")
    raise OptionError(
        f"a safety Hessian is not positive definite after damping (damp={damp}); "
        "increase damp, e.g. --set damp=0.1."
    )


def safe_delta(
    w_aligned: torch.Tensor,
    w_finetuned: torch.Tensor,
    H: torch.Tensor,
    *,
    scale: float = 0.1,
    damp: float = 0.01,
    block: int = 2048,
    sub_block: int = 4,
    exclude: float = 0.15,
) -> SafeDeltaResult:
    """Safe Delta on one Linear: W_A, W_F (out, in), H (in, in) the safety-input Gram of A's layer."""
    if H.shape != (w_aligned.shape[1], w_aligned.shape[1]):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not fit a weight of shape {tuple(w_aligned.shape)}")
    Hinv = hessian_inverse_factor(H, damp)
    return safe_delta_sweep(
        w_aligned, w_finetuned, Hinv, scale=scale, block=block, sub_block=sub_block, exclude=exclude
    )


def safe_delta_sweep(
    w_aligned: torch.Tensor,
    w_finetuned: torch.Tensor,
    Hinv: torch.Tensor,
    *,
    scale: float = 0.1,
    block: int = 2048,
    sub_block: int = 4,
    exclude: float = 0.15,
    keep: torch.Tensor | None = None,
) -> SafeDeltaResult:
    """Steps 2–4 of Safe Delta given ``Hinv`` from ``hessian_inverse_factor``.

    ``keep`` (out, in) bool fixes the kept entries instead of the budgeted selection (then
    ``scale`` and ``exclude`` are unused); the compensation is the same.
    """
    if w_aligned.shape != w_finetuned.shape:
        raise ValueError(f"W_A {tuple(w_aligned.shape)} and W_F {tuple(w_finetuned.shape)} differ in shape")
    if keep is not None and keep.shape != w_aligned.shape:
        raise ValueError(f"keep mask {tuple(keep.shape)} does not fit a weight of shape {tuple(w_aligned.shape)}")
    rows, columns = w_aligned.shape
    W = w_aligned.to(torch.float32, copy=True)
    W_F = w_finetuned.to(torch.float32)
    mask = torch.empty_like(W, dtype=torch.bool) if keep is None else keep
    kept_cost = 0.0
    est_safety_cost = 0.0

    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if keep is None:
            kappa = 1.0 / Hinv1.diagonal().square()
            eps = (scale / 2) * (rows / BUDGET_HIDDEN_SIZE) * kappa.mean().item()
            selection = kernels.select_block(W_F[:, i1:i2], W[:, i1:i2], kappa, eps, exclude)
            mask[:, i1:i2] = selection.keep
            kept_cost += selection.kept_cost.item()

        Q1, Err1 = kernels.compensate_block(W[:, i1:i2], W_F[:, i1:i2], mask[:, i1:i2], Hinv1, sub_block)
        W[:, i1:i2] = Q1
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
        est_safety_cost += Err1.square().sum(dtype=torch.float64).item()

    return SafeDeltaResult(W, mask, kept_cost, est_safety_cost)


def _repair(weight: WeightTensors, params: SafeDeltaParams, state: None) -> Repaired:
    if not weight.is_linear:
        out = weight.aligned if params.other_params == "aligned" else weight.finetuned
        return Repaired(out, delta_norms(weight.aligned, weight.finetuned, out))
    if params.scale == "auto":
        raise OptionError("scale=auto must be resolved to a number before repair; pass e.g. --set scale=0.1.")
    assert weight.hessian is not None
    result = safe_delta(
        weight.aligned,
        weight.finetuned,
        weight.hessian(),
        scale=params.scale,
        damp=params.damp,
        block=params.block,
        sub_block=params.sub_block,
        exclude=params.exclude,
    )
    stats = delta_norms(weight.aligned, weight.finetuned, result.weight)
    stats.update(kept_fraction=result.kept_fraction, est_safety_cost=result.est_safety_cost)
    return Repaired(result.weight, stats)


register(
    Method(
        name="safedelta",
        summary="Safe Delta: keep fine-tune deltas within a safety budget, OBS-compensate the rest.",
        params=SafeDeltaParams,
        repair=_repair,
        needs_hessian=True,
        tune=TuneSpec("scale", 1e-3, 1e6),
    )
)
