"""Safe LoRA (Hsu et al., NeurIPS 2024; DESIGN §5.3): project the least aligned modules.

Per processed weight l, ``cos_l = cos(vec(C δ_l), vec(δ_l))`` measures how much of the fine-tune
delta lies along the alignment direction V. The modules that look least aligned get
``δ_l ← C δ_l`` (``W_R = W_A + C δ_l``); every other tensor stays as fine-tuned.

- ``select: number``: the ``k`` modules with the lowest cosine, exactly k (ties broken by tensor
  name, so the choice is deterministic); ``select: threshold``: every module with cos ≤ threshold.
- ``projector: reference``: ``C = V Vᵀ / ‖V‖_F`` as Safe LoRA's code (not a projector; see
  ``GramProjector``). ``projector: exact``: the orthogonal projector onto V's whole column space
  (numerical rank, no truncation). For a full-rank V with out <= in (square attention weights,
  down_proj) that space is all of R^out, so the exact projector is I there: cos = 1 and projecting
  changes nothing.
- A module with δ = 0 gets cos = 1 (nothing to repair); one with C δ = 0 ≠ δ gets cos = 0.

The choice needs every module's cosine before any repair: ``survey`` streams the weights once,
keeps one scalar per module and returns a ``SafeLoraSelection`` that ``repair`` reads. For a LoRA
fine-tune δ = s B A, ``lora_cosine`` gives the same cosine from the factors and the projection is
``B ← C B`` with A unchanged (``projection_operator(...).apply(B)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Iterable, Literal

import torch
from pydantic import Field

from deltafix.methods.projectors import AlignmentOperator, GramProjector, exact_projector
from deltafix.methods.registry import AutoTuneParams, Method, Repaired, TuneSpec, WeightTensors, register


class SafeLoraParams(AutoTuneParams):
    select: Literal["number", "threshold"] = Field(
        "number",
        description="number: project the k lowest-cosine modules; threshold: all with cos ≤ threshold.",
    )
    k: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        10, description="modules to project with select: number; 'auto' = the fewest meeting target_asr "
        "on the tune prompts.")
    threshold: float = Field(0.5, ge=-1.0, le=1.0, description="cosine limit with select: threshold.")
    projector: Literal["reference", "exact"] = Field(
        "reference",
        description="reference: C = V Vᵀ/‖V‖_F (Safe LoRA's code); exact: projector onto V's column space.",
    )


@dataclass(frozen=True)
class SafeLoraSelection:
    """The survey's answer: every processed module's cosine and the names chosen for projection."""

    cosines: dict[str, float]
    selected: frozenset[str]


def projection_operator(v: torch.Tensor, projector: Literal["reference", "exact"]) -> AlignmentOperator:
    """C for the alignment direction V (out, in); fp32 on V's device."""
    if projector == "reference":
        return GramProjector(v.float())
    if projector == "exact":
        return exact_projector(v)
    raise ValueError(f"unknown projector {projector!r}")


def _cosine(inner: torch.Tensor, norm2_c: torch.Tensor, norm2_d: torch.Tensor) -> float:
    """cos from <Cδ, δ>, ‖Cδ‖² and ‖δ‖², with the conventions of the module docstring."""
    if norm2_d <= 0:
        return 1.0
    if norm2_c <= 0:
        return 0.0
    return (inner / torch.sqrt(norm2_c * norm2_d)).clamp(-1.0, 1.0).item()


def delta_cosine(op: AlignmentOperator, delta: torch.Tensor) -> float:
    """``cos(vec(C δ), vec(δ))`` for a dense delta (out, in)."""
    delta = delta.float()
    cd = op.apply(delta)
    return _cosine((cd * delta).sum(), cd.square().sum(), delta.square().sum())


def lora_cosine(op: AlignmentOperator, b: torch.Tensor, a: torch.Tensor) -> float:
    """``cos(vec(C B A), vec(B A))`` from B (out, r) and A (r, in) without forming B A.

    With G = A Aᵀ (r, r): ``<CBA, BA> = tr((CB)ᵀ B G)`` and ``‖XA‖² = tr(Xᵀ X G)``. The LoRA
    scaling s cancels in the cosine, so it is not an argument.
    """
    b, a = b.float(), a.float()
    cb = op.apply(b)
    g = a @ a.T
    return _cosine(((cb.T @ b) * g).sum(), ((cb.T @ cb) * g).sum(), ((b.T @ b) * g).sum())


def select_modules(cosines: dict[str, float], params: SafeLoraParams) -> frozenset[str]:
    """Names to project: the k lowest cosines, or all at or below the threshold."""
    if params.select == "threshold":
        return frozenset(name for name, cos in cosines.items() if cos <= params.threshold)
    ranked = sorted(cosines, key=lambda name: (cosines[name], name))
    return frozenset(ranked[: params.k])


def _survey(weights: Iterable[WeightTensors], params: SafeLoraParams) -> SafeLoraSelection:
    cosines: dict[str, float] = {}
    for weight in weights:
        if not weight.is_linear:
            continue
        assert weight.unaligned is not None
        op = projection_operator(weight.aligned - weight.unaligned, params.projector)
        cosines[weight.name] = delta_cosine(op, weight.delta)
    return SafeLoraSelection(cosines, select_modules(cosines, params))


def _repair(weight: WeightTensors, params: SafeLoraParams, state: SafeLoraSelection) -> Repaired:
    if not weight.is_linear:
        return Repaired(weight.finetuned)
    stats = {"cosine": state.cosines[weight.name], "projected": 0.0}
    if weight.name not in state.selected:
        return Repaired(weight.finetuned, stats)
    assert weight.unaligned is not None
    op = projection_operator(weight.aligned - weight.unaligned, params.projector)
    stats["projected"] = 1.0
    return Repaired(weight.aligned + op.apply(weight.delta), stats)


def _lora_b(weight: WeightTensors, b: torch.Tensor, params: SafeLoraParams, state: SafeLoraSelection) -> torch.Tensor:
    """``B ← C B`` for the selected modules (A unchanged), as Safe LoRA does for adapters."""
    if weight.name not in state.selected:
        return b
    assert weight.unaligned is not None
    return projection_operator(weight.aligned - weight.unaligned, params.projector).apply(b.float())


register(
    Method(
        name="safelora",
        summary="Safe LoRA: project the deltas least aligned with θ_A − θ_P onto the alignment direction.",
        params=SafeLoraParams,
        repair=_repair,
        survey=_survey,
        needs_unaligned=True,
        lora_b=_lora_b,
        tune=TuneSpec("k", 1, 512, per_decade=6, safer="higher", integer=True),
    )
)
