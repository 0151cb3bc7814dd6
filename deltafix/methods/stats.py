"""Tensor checks and per-weight numbers shared by the methods and the stages around them."""

from __future__ import annotations

import math

import torch


def delta_norms(aligned: torch.Tensor, finetuned: torch.Tensor, repaired: torch.Tensor) -> dict[str, float]:
    """``‖W_F − W_A‖`` and ``‖W_R − W_A‖`` (Frobenius): how much of the fine-tune survives."""
    return {
        "delta_norm_before": torch.linalg.vector_norm(finetuned - aligned).item(),
        "delta_norm_after": torch.linalg.vector_norm(repaired - aligned).item(),
    }

def all_finite(tensor: torch.Tensor, reduced: float | None = None) -> bool:
    """No NaN/Inf: one fast reduction (NaN and Inf propagate into a sum, or into ``reduced``, a
    norm over ``tensor`` the caller has computed anyway); the exact elementwise check runs only
    when that is not finite, which a legitimate overflow could also cause."""
    return math.isfinite(tensor.sum() if reduced is None else reduced) or bool(torch.isfinite(tensor).all())
