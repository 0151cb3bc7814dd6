"""Safety/utility RegMean (ours, DESIGN §5.6): the weight that best serves both input sets.

Per decoder-layer Linear, ``H_s`` is the Gram of A's inputs on the safety data (Safe Delta's H)
and ``H_u`` the Gram of F's inputs on the user's data. Each output row w minimises

    (w − w_A)ᵀ H_s (w − w_A) + μ (w − w_F)ᵀ H_u (w − w_F) + λ ‖w − w_A‖²,

i.e. stay close to A's outputs on safety inputs and to F's outputs on user inputs; the damping
``λ = damp · mean(diag H_s)`` is a ridge towards W_A. Setting the gradient to zero gives, for all
rows at once, ``W_R = W_A + μ δ H_u (H_s + μ H_u + λI)⁻¹`` with ``δ = W_F − W_A``: one Cholesky
factorisation per Linear. μ → 0 gives W_A; μ → ∞ gives W_F when H_u is invertible.

With ``sequential`` (the default) the weights are solved in forward order on the inputs ``X_R``
of the partially repaired model (``deltafix.sequential``), with the same targets: A's outputs on
the safety data, F's on the user's. The objective becomes
``‖W X_R^s − W_A X_A^s‖² + μ ‖W X_R^u − W_F X_F^u‖² + λ ‖W − W_A‖²``, solved by
``W = (W_A C_s + μ W_F C_u + λ W_A)(G_s + μ G_u + λI)⁻¹`` with the Grams ``G = X_Rᵀ X_R`` and cross
Grams ``C = X_targetᵀ X_R``; it reduces to the formula above when ``X_R`` equals A's inputs on the
safety data and F's on the user's. The token embedding (one-hot inputs: diagonal Grams, i.e. a
per-token blend weighted by how often each token occurs in each data set) and a separate output
head are solved the same way, so the inputs of every later weight are R's real ones. On the
testbed this is what keeps the task at a safe μ (see ``recipes/regmean.yaml``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from deltafix.errors import InputError, OptionError
from deltafix.methods.registry import (
    AutoTuneParams,
    Method,
    Repaired,
    SequentialSpec,
    ShiftedGrams,
    TuneSpec,
    WeightTensors,
    register,
)
from deltafix.methods.stats import delta_norms

if TYPE_CHECKING:
    from deltafix.sequential import SolvedWeights


class RegMeanParams(AutoTuneParams):
    mu: Annotated[float, Field(gt=0.0)] | Literal["auto"] = Field(
        1.0,
        description="μ: weight of the user data against the safety data; "
        "'auto' = the largest μ meeting target_asr on the tune prompts.",
    )
    damp: float = Field(0.01, ge=0.0, description="ridge λ towards W_A, as a fraction of mean(diag H_s).")
    other_params: Literal["finetuned", "aligned"] = Field(
        "finetuned",
        description="value of tensors that are not solved: norms and biases, and with sequential=false "
        "also the embeddings and the output head.",
    )
    sequential: bool = Field(
        True,
        description="solve the embedding, every decoder Linear and the output head in forward order on the "
        "inputs of the partially repaired model (not cacheable: one calibration pass per repair); "
        "false = independent Hessians of A and F, cached, decoder Linears only.",
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
    return W_A + torch.cholesky_solve(mu * (H_u @ delta.T), _factor(M, damp)).T


def _factor(M: torch.Tensor, damp: float) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(M)
    if info.item() != 0 and not bool(torch.isfinite(M).all()):  # no damping repairs NaN/Inf
        raise InputError("H_s + mu·H_u contains NaN or Inf: a model's activations on the calibration data "
                         "overflow; check the models' weights and the calibration data.")
    if info.item() != 0:
        raise OptionError(
            f"H_s + mu·H_u is not positive definite after damping (damp={damp}); "
            "increase damp, e.g. --set damp=0.1."
        )
    return L


def regmean_merge_shifted(w_aligned: torch.Tensor, w_finetuned: torch.Tensor, grams: ShiftedGrams, *, mu: float,
                          damp: float = 0.01) -> torch.Tensor:
    """``(W_A C_s + μ W_F C_u + λ W_A)(G_s + μ G_u + λI)⁻¹`` for weights (out, in), fp32 result.

    1-D (diagonal) Grams make it a per-input-column blend; a column that no data reaches and no
    ridge holds (``G_s + μ G_u + λ = 0``) keeps W_A, the ridge's limit.
    """
    W_A = w_aligned.to(torch.float32)
    W_F = w_finetuned.to(torch.float32)
    G_s, C_s, G_u, C_u = (g.to(torch.float32) for g in
                          (grams.safety, grams.safety_cross, grams.utility, grams.utility_cross))
    lam = damp * (G_s if G_s.dim() == 1 else G_s.diagonal()).mean()
    if G_s.dim() == 1:
        den = G_s + mu * G_u + lam
        blend = (W_A * (C_s + lam) + mu * W_F * C_u) / den.clamp_min(torch.finfo(torch.float32).tiny)
        return torch.where(den > 0, blend, W_A)
    M = G_s + mu * G_u
    M.diagonal().add_(lam)
    rhs = W_A @ C_s + mu * (W_F @ C_u) + lam * W_A
    return torch.cholesky_solve(rhs.T, _factor(M, damp)).T


def _repair(weight: WeightTensors, params: RegMeanParams, state: SolvedWeights | None) -> Repaired:
    if state is not None:
        if weight.name in state:
            out = state.get(weight.name).to(weight.aligned.device)
        elif weight.is_linear:
            out = weight.aligned  # never runs on either data set: the ridge keeps W_A
        else:
            out = weight.aligned if params.other_params == "aligned" else weight.finetuned
        return Repaired(out, delta_norms(weight.aligned, weight.finetuned, out))
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


def _solve(w_aligned: torch.Tensor, w_finetuned: torch.Tensor, grams: ShiftedGrams,
           params: RegMeanParams) -> torch.Tensor:
    if params.mu == "auto":
        raise OptionError("mu=auto must be resolved to a number before repair; pass e.g. --set mu=1.0.")
    return regmean_merge_shifted(w_aligned, w_finetuned, grams, mu=params.mu, damp=params.damp)


register(
    Method(
        name="regmean",
        summary="Safety/utility RegMean: per row, stay close to A on safety inputs and to F on user inputs.",
        params=RegMeanParams,
        repair=_repair,
        needs_hessian=True,
        tune=TuneSpec("mu", 1e-3, 1e3, per_decade=6),
        needs_utility=True,
        sequential=SequentialSpec(enabled=lambda params: params.sequential, solve=_solve,
                                  keep=lambda params: params.other_params),
    )
)
