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

Compensation (``compensation``). ``exact`` (default) is the OBS/GPTQ sweep: inside a sub-block
the columns are fixed one by one, so ``sub_block`` changes speed only. ``reference`` is the
released code's (ColinLu50/SafeDelta, ``llama2/safedelta/safedelta_runner.py``,
``SafeDeltaRunner.adjust_delta``): per sub-block of 4 columns it fixes all of them at once from
their values on entry, scales the errors by ``diag(U)`` and applies them only to the block's
columns after the sub-block, then the block's errors to the later blocks. The coupling between the
columns of one sub-block is skipped, so a dropped entry is not compensated for kept entries to its
left in the same sub-block, and ``sub_block`` changes the result (the two coincide for
``sub_block = 1``). ``compensate_block_released`` ports it in torch, same operations in the same
order and fp32, so that for the same kept entries the weight equals the released code's bit for bit
(on the same device and BLAS); it has no CUDA/CPU kernel, being for comparison, not speed. For the
same reason ``reference`` also rounds the damping as released (``damped_hessian(released=True)``).

The selection is ours in both modes (``kernels.select_block``): entries are ordered by κ, ties
(every row of a column shares κ) by column then row, where the released code leaves them to an
unstable argsort, and cumulative costs are summed in float64 where it sums in float32. The same
columns are kept whole; the rows kept of the one column that the budget cuts can differ, and later
blocks then start from weights compensated for different entries. Bit for bit with the released
code therefore means: for the same kept entries (``safe_delta_sweep(keep=...)``).

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

Compensation = Literal["exact", "reference"]


class SafeDeltaParams(AutoTuneParams):
    scale: Annotated[float, Field(ge=0.0)] | Literal["auto"] = Field(
        0.1,
        description="s: safety budget (0.11 harmful-only fine-tunes, 0.10 mixed); "
        "'auto' = the largest s meeting target_asr on the tune prompts.",
    )
    damp: float = Field(0.01, ge=0.0, description="Hessian damping, as a fraction of mean(diag H).")
    block: int = Field(2048, ge=1, description="columns per selection block.")
    sub_block: int = Field(4, ge=1, description="columns per compensation sub-block (speed only with "
                           "compensation=exact; with reference it sets the skipped coupling, 4 as released).")
    compensation: Compensation = Field(
        "exact", description="exact: the OBS sweep column by column; reference: the released code's, which "
        "skips the coupling inside each sub-block of 4 columns (bit for bit, for comparison).")
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
    (computed exactly as ``Σ Err²`` of the exact sweep; by ``safety_cost`` for ``reference``).
    """

    weight: torch.Tensor
    keep: torch.Tensor
    kept_cost: float
    est_safety_cost: float

    @property
    def kept_fraction(self) -> float:
        return self.keep.float().mean().item()


def damped_hessian(H: torch.Tensor, damp: float, *, released: bool = False) -> torch.Tensor:
    """H (in, in) with dead inputs set to 1 on the diagonal and ``damp · mean(diag H)`` added; fp32 copy.

    ``released`` takes the mean over a contiguous copy of the diagonal, as the released code
    does, instead of the strided view: torch sums the two in different orders, so the damping
    can differ in its last bit and with it every later one (``compensation=reference`` needs
    the released bits; the default keeps its own).
    """
    H = H.to(torch.float32, copy=True)
    diag = H.diagonal()
    diag[diag == 0] = 1.0
    diag.add_(damp * (diag.clone() if released else diag).mean())
    return H


def hessian_inverse_factor(H: torch.Tensor, damp: float, *, released: bool = False) -> torch.Tensor:
    """``Hinv``: the upper Cholesky factor U of ``damped_hessian(H, damp, released=released)⁻¹``,
    (in, in) fp32.

    This depends on A and the safety data only, so the pipeline may cache it per Linear.
    """
    L, info = torch.linalg.cholesky_ex(damped_hessian(H, damp, released=released))
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
    compensation: Compensation = "exact",
) -> SafeDeltaResult:
    """Safe Delta on one Linear: W_A, W_F (out, in), H (in, in) the safety-input Gram of A's layer."""
    if H.shape != (w_aligned.shape[1], w_aligned.shape[1]):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not fit a weight of shape {tuple(w_aligned.shape)}")
    Hinv = hessian_inverse_factor(H, damp, released=compensation == "reference")
    return safe_delta_sweep(
        w_aligned, w_finetuned, Hinv, scale=scale, block=block, sub_block=sub_block, exclude=exclude,
        compensation=compensation,
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
    compensation: Compensation = "exact",
) -> SafeDeltaResult:
    """Steps 2–4 of Safe Delta given ``Hinv`` from ``hessian_inverse_factor``.

    ``keep`` (out, in) bool fixes the kept entries instead of the budgeted selection (then
    ``scale`` and ``exclude`` are unused); the compensation is the same. ``compensation``: see
    the module doc; ``exact`` goes through the kernels, ``reference`` through
    ``compensate_block_released`` in torch on the tensors' device.
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

        if compensation == "exact":
            Q1, Err1 = kernels.compensate_block(W[:, i1:i2], W_F[:, i1:i2], mask[:, i1:i2], Hinv1, sub_block)
            W[:, i1:i2] = Q1
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
            est_safety_cost += Err1.square().sum(dtype=torch.float64).item()
        else:
            Q1, Err1 = compensate_block_released(W[:, i1:i2], W_F[:, i1:i2], mask[:, i1:i2], Hinv1, sub_block)
            W[:, i1:i2] = Q1
            # a product then a subtraction, as released: addmm_ rounds differently once BLAS splits
            # the inner dimension (blocks of hundreds of columns)
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if compensation == "reference":
        est_safety_cost = safety_cost(W - w_aligned.to(torch.float32), Hinv)
    return SafeDeltaResult(W, mask, kept_cost, est_safety_cost)


def compensate_block_released(
    w: torch.Tensor,
    w_finetuned: torch.Tensor,
    keep: torch.Tensor,
    Hinv: torch.Tensor,
    sub_block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The released code's compensation over one block (``compensation=reference``).

    Same inputs and outputs as ``kernels.compensate_block``: ``w``, ``w_finetuned``, ``keep``
    (out, b) fp32/bool, ``Hinv`` (b, b) the block's diagonal block of U; returns ``(Q, Err)``.
    Per sub-block, every column is fixed from its value on entry to the sub-block (kept entries
    to W_F, dropped ones stay), ``Err = (w − q) / diag(U)``, and ``Err · U[sub, later]`` is
    subtracted from the block's later columns only: unlike the exact sweep, a column's error
    never reaches the other columns of its sub-block. The operations, their order and the
    (out, b) layout are the released code's, which is what makes the results equal bit for bit;
    a faster layout (the exact sweep's transposed copies) would change the BLAS rounding.
    """
    b = w.shape[1]
    W1 = w.clone()
    Q1 = torch.empty_like(W1)
    Err1 = torch.empty_like(W1)
    d = Hinv.diagonal()
    for s0 in range(0, b, sub_block):
        s1 = min(s0 + sub_block, b)
        q = torch.where(keep[:, s0:s1], w_finetuned[:, s0:s1], W1[:, s0:s1])
        err = (W1[:, s0:s1] - q) / d[s0:s1]
        W1[:, s1:] -= err @ Hinv[s0:s1, s1:]
        Q1[:, s0:s1] = q
        Err1[:, s0:s1] = err
    return Q1, Err1


def safety_cost(change: torch.Tensor, Hinv: torch.Tensor) -> float:
    """``Σ_rows dᵀ H d`` for ``change`` d (out, in) fp32, with ``H⁻¹ = UᵀU`` and ``Hinv`` = U.

    ``H = U⁻¹ U⁻ᵀ``, so ``dᵀ H d = ‖d U⁻¹‖²``: one triangular solve, no H needed. The exact sweep
    gets this as ``Σ Err²`` for free; the released compensation is not the OBS update, so its
    ``Σ Err²`` is not the cost and ``est_safety_cost`` comes from here instead.
    """
    scaled = torch.linalg.solve_triangular(Hinv, change, upper=True, left=False)
    return scaled.square().sum(dtype=torch.float64).item()


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
        compensation=params.compensation,
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
