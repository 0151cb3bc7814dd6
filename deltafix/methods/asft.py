"""AsFT-style projection, post hoc (DESIGN §5.2; the closed form is *ours*).

AsFT (Yang et al. 2025) trains with the penalty ``λ ‖(I − P) X‖²`` that keeps updates near the
alignment direction. Applied after the fact to a finished delta δ (out, in), the penalised fit

    minimise_X  ‖X − δ‖²_F + λ ‖(I − P) X‖²_F,   normal equations  (I + λ (I − P)ᵀ(I − P)) X = δ,

has a closed form for each projector:

- ``exact``: ``P = U_k U_kᵀ`` (truncated SVD of V, ``rank``), so ``(I − P)² = I − P`` and
  ``X = Pδ + (I − P)δ / (1 + λ)``. λ = inf gives the hard projection ``X = Pδ``.
- ``reference``: ``C = V Vᵀ / ‖V‖_F`` as AsFT's code, with eigenvalues ``c_i = σ_i² / ‖V‖_F`` on
  V's left singular vectors u_i and 0 elsewhere. C is symmetric, so
  ``X = (I + λ (I − C)²)⁻¹ δ = Σ_i u_i u_iᵀ δ / (1 + λ (1 − c_i)²) + (I − UUᵀ) δ / (1 + λ)``.
  Because c_i is not 1 (it grows with ‖V‖ and may exceed 1, which is penalised like falling short
  of 1), this is a soft shrinkage rather than a projection. Its λ → ∞ limit keeps only the
  directions with c_i = 1 exactly and removes everything else; for a generic V there is none and
  the limit is X = 0, i.e. W_R = W_A. λ = inf computes that limit, counting c_i within
  ``UNIT_EIGENVALUE_TOL`` of 1 as 1 (fp32 SVD rounding). ``rank`` does not apply here.

For a LoRA fine-tune δ = s B A the same operator M gives ``X = M δ = s (M B) A``, so the result
stays an adapter with ``B ← M B`` (``alignment_operator(...).apply(B)``).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator

from deltafix.methods.projectors import (
    SpectralOperator,
    exact_projector,
    reference_eigen,
)
from deltafix.methods.registry import AutoTuneParams, Method, Repaired, TuneSpec, WeightTensors, register

UNIT_EIGENVALUE_TOL = 1e-5


class AsftParams(AutoTuneParams):
    lam: Annotated[float, Field(ge=0.0, allow_inf_nan=True)] | Literal["auto"] = Field(
        100.0,
        description="λ: weight of the off-alignment penalty; inf = hard projection; "
        "'auto' = the smallest λ meeting target_asr on the tune prompts.",
    )
    projector: Literal["exact", "reference"] = Field(
        "reference",
        description="reference: C = V Vᵀ/‖V‖_F (AsFT's code; the one that lowered ASR on the testbed); "
        "exact: P_k = U_k U_kᵀ.",
    )
    rank: int | float = Field(
        0.9,
        description=(
            "k of P_k (exact only): an int >= 1, or a share in (0,1) of Σσ² held by the top k "
            "singular values of V. 0.9 keeps the directions that carry most of the alignment "
            "change and drops the long low-energy tail, which would otherwise make P close to I."
        ),
    )
    other_params: Literal["finetuned", "aligned"] = Field(
        "finetuned",
        description=(
            "non-Linear tensors (embeddings, norms, lm_head): AsFT only constrains the Linear "
            "updates, so by default they stay as fine-tuned."
        ),
    )

    @field_validator("rank")
    @classmethod
    def _check_rank(cls, rank: int | float) -> int | float:
        if isinstance(rank, int) and rank < 1:
            raise ValueError("an integer rank must be >= 1")
        if isinstance(rank, float) and not 0.0 < rank < 1.0:
            raise ValueError("a fractional rank must lie in (0, 1)")
        return rank


def alignment_operator(
    v: torch.Tensor,
    *,
    lam: float,
    projector: Literal["exact", "reference"] = "exact",
    rank: int | float = 0.9,
) -> SpectralOperator:
    """The AsFT post-hoc operator M with ``X = M δ`` for the alignment direction V (out, in).

    Apply it to a dense delta (out, in) or to a LoRA ``B`` (out, r); fp32 on V's device.
    """
    if lam < 0 or math.isnan(lam):
        raise ValueError(f"lam must be >= 0, got {lam}")
    rest = 0.0 if math.isinf(lam) else 1.0 / (1.0 + lam)
    if projector == "exact":
        p = exact_projector(v, rank)
        return SpectralOperator(p.basis, p.gains, rest)
    if projector == "reference":
        basis, eig = reference_eigen(v)
        if math.isinf(lam):
            gains = ((eig - 1.0).abs() <= UNIT_EIGENVALUE_TOL).to(eig.dtype)
        else:
            gains = 1.0 / (1.0 + lam * (1.0 - eig) ** 2)
        return SpectralOperator(basis, gains, rest)
    raise ValueError(f"unknown projector {projector!r}")


def _repair(weight: WeightTensors, params: AsftParams, state: None) -> Repaired:
    if not weight.is_linear:
        kept = weight.finetuned if params.other_params == "finetuned" else weight.aligned
        return Repaired(kept)
    if params.lam == 0.0:
        norm = torch.linalg.vector_norm(weight.delta).item()
        return Repaired(weight.finetuned, {"delta_norm": norm, "delta_norm_after": norm})
    assert weight.unaligned is not None
    op = alignment_operator(
        weight.aligned - weight.unaligned, lam=params.lam, projector=params.projector, rank=params.rank
    )
    delta = weight.delta
    x = op.apply(delta)
    stats = {
        "delta_norm": torch.linalg.vector_norm(delta).item(),
        "delta_norm_after": torch.linalg.vector_norm(x).item(),
    }
    if params.projector == "exact":
        stats["rank"] = float(op.basis.shape[1])
    return Repaired(weight.aligned + x, stats)


def _lora_b(weight: WeightTensors, b: torch.Tensor, params: AsftParams, state: None) -> torch.Tensor:
    """``B ← M B``: the same operator as the dense path, so (M sB) A = M (sBA)."""
    if params.lam == 0.0:
        return b
    assert weight.unaligned is not None
    op = alignment_operator(
        weight.aligned - weight.unaligned, lam=params.lam, projector=params.projector, rank=params.rank
    )
    return op.apply(b.float())


register(
    Method(
        name="asft",
        summary="AsFT post hoc: keep the delta inside the alignment subspace, shrink the rest by 1/(1+λ).",
        params=AsftParams,
        repair=_repair,
        needs_unaligned=True,
        lora_b=_lora_b,
        tune=TuneSpec("lam", 0.1, 1e4, per_decade=3, safer="higher"),
    )
)
