"""Safety/utility RegMean (ours, DESIGN §5.6): the weight that best serves both input sets.

Per decoder-layer Linear, ``H_s`` is the Gram of A's inputs on the safety data (Safe Delta's H)
and ``H_u`` the Gram of F's inputs on the user's data. Each output row w minimises

    (w − w_A)ᵀ H_s (w − w_A) + μ (w − w_F)ᵀ H_u (w − w_F) + λ ‖w − w_A‖²,

i.e. stay close to A's outputs on safety inputs and to F's outputs on user inputs; the damping
``λ = damp · mean(diag H_s)`` is a ridge towards W_A. Setting the gradient to zero gives, for all
rows at once, ``W_R = W_A + μ δ H_u (H_s + μ H_u + λI)⁻¹`` with ``δ = W_F − W_A``: one Cholesky
factorisation per Linear. μ → 0 gives W_A; μ → ∞ gives W_F when H_u is invertible.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from deltafix.errors import OptionError
from deltafix.methods.registry import AutoTuneParams, Method, Repaired, TuneSpec, WeightTensors, register
from deltafix.methods.stats import delta_norms


class RegMeanParams(AutoTuneParams):
    mu: Annotated[float, Field(gt=0.0)] | Literal["auto"] = Field(
        1.0,
        description="μ: weight of the user data against the safety data; "
        "'auto' = the largest μ meeting target_asr on the tune prompts.",
    )
    damp: float = Field(0.01, ge=0.0, description="ridge λ towards W_A, as a fraction of mean(diag H_s).")
    other_params: Literal["finetuned", "aligned"] = Field(
        "finetuned", description="value of tensors that are not decoder-layer Linear weights."
    )


def regmean_merge(
    w_aligned: torch.Tensor,
    w_finetuned: torch.Tensor,
    H_s: torch.Tensor,
    H_u: torch.Tensor,
    *,
    mu: float,
    damp: float = 0.01,
) -> torch.Tensor:
    """``W_A + μ δ H_u (H_s + μ H_u + λI)⁻¹``; W_A, W_F (out, in), H_s, H_u (in, in); fp32 result.

    The right-hand solve is done on the transposes, ``M Xᵀ = μ H_u δᵀ`` (M and H_u symmetric),
    with one Cholesky factor of M.
    """
    W_A = w_aligned.to(torch.float32)
    delta = w_finetuned.to(torch.float32) - W_A
    H_s = H_s.to(torch.float32)
    H_u = H_u.to(torch.float32)
    M = H_s + mu * H_u
    M.diagonal().add_(damp * H_s.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(M)
    if info.item() != 0:
        raise OptionError(
            f"H_s + mu·H_u is not positive definite after damping (damp={damp}); "
            "increase damp, e.g. --set damp=0.1."
        )
    return W_A + torch.cholesky_solve(mu * (H_u @ delta.T), L).T


def _repair(weight: WeightTensors, params: RegMeanParams, state: None) -> Repaired:
    if not weight.is_linear:
        out = weight.aligned if params.other_params == "aligned" else weight.finetuned
        return Repaired(out, delta_norms(weight.aligned, weight.finetuned, out))
    if params.mu == "auto":
        raise OptionError("mu=auto must be resolved to a number before repair; pass e.g. --set mu=1.0.")
    assert weight.hessian is not None and weight.utility_hessian is not None
    out = regmean_merge(
        weight.aligned,
        weight.finetuned,
        weight.hessian(),
        weight.utility_hessian(),
        mu=params.mu,
        damp=params.damp,
    )
    return Repaired(out, delta_norms(weight.aligned, weight.finetuned, out))


register(
    Method(
        name="regmean",
        summary="Safety/utility RegMean: per row, stay close to A on safety inputs and to F on user inputs.",
        params=RegMeanParams,
        repair=_repair,
        needs_hessian=True,
        tune=TuneSpec("mu", 1e-4, 1e4),
        needs_utility=True,
    )
)
