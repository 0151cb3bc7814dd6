"""Safety/utility RegMean (ours, DESIGN §5.6): the weight that best serves both input sets.

Per decoder-layer Linear, ``H_s`` is the Gram of A's inputs on the safety data (Safe Delta's H)
and ``H_u`` the Gram of F's inputs on the user's data. Each output row w minimises

    (w − w_A)ᵀ H_s (w − w_A) + μ (w − w_F)ᵀ H_u (w − w_F) + λ ‖w − w_A‖²,

i.e. stay close to A's outputs on safety inputs and to F's outputs on user inputs; the damping
``λ = damp · mean(diag H_s)`` is a ridge towards W_A. Setting the gradient to zero gives, for all
rows at once, ``W_R = W_A + μ δ H_u (H_s + μ H_u + λI)⁻¹`` with ``δ = W_F − W_A``: one Cholesky
factorisation per Linear. μ → 0 gives W_A; μ → ∞ gives W_F when H_u is invertible.

With ``sequential`` (the default) the weights are solved in forward order on the inputs ``X_R``
of the partially repaired model (``deltafix.engine.sequential``), with the same targets: A's outputs on
the safety data, F's on the user's. The objective becomes
``‖W X_R^s − W_A X_A^s‖² + μ ‖W X_R^u − W_F X_F^u‖² + λ ‖W − W_A‖²``, solved by
``W = (W_A C_s + μ W_F C_u + λ W_A)(G_s + μ G_u + λI)⁻¹`` with the Grams ``G = X_Rᵀ X_R`` and cross
Grams ``C = X_targetᵀ X_R``; it reduces to the formula above when ``X_R`` equals A's inputs on the
safety data and F's on the user's. The token embedding (one-hot inputs: diagonal Grams, i.e. a
per-token blend weighted by how often each token occurs in each data set) and a separate output
head are solved the same way, so the inputs of every later weight are R's real ones. On the
testbed this is what keeps the task at a safe μ (see ``deltafix/recipes/regmean.yaml``).
"""

from __future__ import annotations

import warnings
from typing import Annotated, Callable, Literal

import torch
from pydantic import Field

from deltafix.errors import InputError, OptionError
from deltafix.methods.registry import (
    AutoTuneParams,
    Method,
    Repaired,
    SequentialSpec,
    ShiftedGrams,
    SolvedState,
    TuneSpec,
    WeightTensors,
    register,
)
from deltafix.methods.stats import delta_norms


class RegMeanParams(AutoTuneParams):
    mu: Annotated[float, Field(gt=0.0)] | Literal["auto"] = Field(
        3.0,
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
    lam = damp * H_s.to(torch.float32).diagonal().mean()

    def rhs(dtype: torch.dtype) -> torch.Tensor:
        return mu * (H_u.to(dtype) @ (w_finetuned.to(dtype) - w_aligned.to(dtype)).T)

    return W_A + _solve_spd(lambda dtype: _damped_gram(H_s, H_u, mu, lam, dtype), rhs).T


def _damped_gram(G_s: torch.Tensor, G_u: torch.Tensor, mu: float, lam: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """``G_s + μ G_u + λ I`` (in, in) formed in ``dtype``."""
    M = G_s.to(dtype) + mu * G_u.to(dtype)
    M.diagonal().add_(lam.to(dtype))
    return M


def _solve_spd(gram: Callable[[torch.dtype], torch.Tensor], rhs: Callable[[torch.dtype], torch.Tensor]
               ) -> torch.Tensor:
    """``M⁻¹ B`` for the damped Gram ``M = gram(dtype)`` (in, in) and ``B = rhs(dtype)``, fp32 result;
    never fails on conditioning.

    A Gram dominated by ``μ H_u`` at large μ loses the ridge to fp32 rounding and with it
    definiteness. The solve then forms M and B in fp64, and only if that fails too adds a
    growing diagonal jitter (1e-6 up to 1 × mean(diag M)), with a warning, so that an ``auto``
    search or a long sequential solve never dies on one badly conditioned weight.
    """
    M = gram(torch.float32)
    if not bool(torch.isfinite(M).all()):  # no damping repairs NaN/Inf
        raise InputError("H_s + mu·H_u contains NaN or Inf: a model's activations on the calibration data "
                         "overflow; check the models' weights and the calibration data.")
    L, info = torch.linalg.cholesky_ex(M)
    if info.item() == 0:
        return torch.cholesky_solve(rhs(torch.float32), L)
    M64 = gram(torch.float64)
    scale = M64.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    for jitter in (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        L64, info = torch.linalg.cholesky_ex(M64 + jitter * scale * torch.eye(M.shape[0], dtype=M64.dtype,
                                                                                device=M.device))
        if info.item() == 0:
            if jitter:
                warnings.warn(f"RegMean: a Gram was not positive definite in fp64; added {jitter:g} × its mean "
                              "diagonal as extra damping for that weight.", DampingWarning, stacklevel=2)
            return torch.cholesky_solve(rhs(torch.float64), L64).to(torch.float32)
    raise InputError("H_s + mu·H_u stays indefinite even with damping equal to its mean diagonal: "
                     "the calibration activations are degenerate; check the models and the data.")


class DampingWarning(UserWarning):
    """Extra damping was added to one weight's solve (see ``_solve_spd``)."""


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

    def rhs(dtype: torch.dtype) -> torch.Tensor:
        w_a, w_f = W_A.to(dtype), W_F.to(dtype)
        return (w_a @ C_s.to(dtype) + mu * (w_f @ C_u.to(dtype)) + lam.to(dtype) * w_a).T

    return _solve_spd(lambda dtype: _damped_gram(G_s, G_u, mu, lam, dtype), rhs).T


def _repair(weight: WeightTensors, params: RegMeanParams, state: SolvedState | None) -> Repaired:
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
