"""The AsFT training penalty (DESIGN §5.2): keep LoRA updates inside the alignment direction.

For each LoRA-wrapped Linear l with alignment direction ``V_l = W_A − W_P`` (out, in) and the
reference operator ``C_l = V_l V_lᵀ / ‖V_l‖_F``, the loss gets ``λ Σ_l ‖(I − C_l) B_l A_l‖²_F`` on
the unscaled LoRA product. With ``X = (I − C) B = B − V (Vᵀ B) / ‖V‖_F`` (out, r),
``‖X A‖²_F = trace((Xᵀ X)(A Aᵀ))``: two r×r Grams, never an out×out or out×in product.
Each V is held on the training device in the base weight's dtype, so the penalty costs about one
extra copy of the targeted weights in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer

from deltafix.errors import MismatchError
from deltafix.io.reader import CheckpointReader

PEFT_PREFIX = "base_model.model."


def asft_penalty(B: torch.Tensor, A: torch.Tensor, V: torch.Tensor, v_norm: float) -> torch.Tensor:
    """``‖(I − VVᵀ/‖V‖_F) B A‖²_F`` for B (out, r), A (r, in), V (out, in); fp32 scalar, differentiable.

    A zero V (module unchanged by alignment) gives C = 0, so the penalty is ‖BA‖²_F.
    """
    B, A = B.float(), A.float()
    X = B - V.float() @ (V.float().T @ B) / v_norm if v_norm > 0 else B
    return ((X.T @ X) * (A @ A.T)).sum()


@dataclass(frozen=True)
class AsftTerm:
    """One LoRA module's share of the penalty: its A (r, in), B (out, r) parameters, V and ‖V‖_F."""

    name: str
    lora_A: torch.nn.Parameter
    lora_B: torch.nn.Parameter
    V: torch.Tensor
    v_norm: float


def asft_terms(model: torch.nn.Module, unaligned: CheckpointReader, adapter: str = "default") -> list[AsftTerm]:
    """Pair every LoRA-wrapped Linear of a PEFT model with ``V = W_A − W_P`` read from the unaligned P.

    Module names are the PEFT model's (``base_model.model.<checkpoint name>``); the base layer's
    current weight is W_A. A module missing from P, or of another shape, is a ``MismatchError``.
    """
    terms = []
    for name, module in model.named_modules():
        if not (isinstance(module, LoraLayer) and adapter in module.lora_A):
            continue
        w_a = module.get_base_layer().weight
        key = name.removeprefix(PEFT_PREFIX) + ".weight"
        if key not in unaligned:
            raise MismatchError(f"the unaligned model has no tensor {key}; --unaligned must be the pre-alignment "
                                "base of --base (same architecture).")
        w_p = unaligned.get(key)
        if tuple(w_p.shape) != tuple(w_a.shape):
            raise MismatchError(f"{key} is {tuple(w_p.shape)} in the unaligned model but {tuple(w_a.shape)} in the "
                                "base; --unaligned must share the base's architecture.")
        V = (w_a.detach().float() - w_p.to(w_a.device).float()).to(w_a.dtype)
        terms.append(AsftTerm(name, module.lora_A[adapter].weight, module.lora_B[adapter].weight, V,
                              float(torch.linalg.vector_norm(V.float()))))
    return terms


def asft_regulariser(terms: list[AsftTerm]) -> torch.Tensor:
    """``Σ_l ‖(I − C_l) B_l A_l‖²_F`` over all terms (fp32 scalar; multiply by λ outside)."""
    return torch.stack([asft_penalty(t.lora_B, t.lora_A, t.V, t.v_norm) for t in terms]).sum()
