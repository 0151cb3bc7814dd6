"""Per-weight numbers that several methods put in the report."""

from __future__ import annotations

import torch


def delta_norms(aligned: torch.Tensor, finetuned: torch.Tensor, repaired: torch.Tensor) -> dict[str, float]:
    """``‖W_F − W_A‖`` and ``‖W_R − W_A‖`` (Frobenius): how much of the fine-tune survives."""
    return {
        "delta_norm_before": torch.linalg.vector_norm(finetuned - aligned).item(),
        "delta_norm_after": torch.linalg.vector_norm(repaired - aligned).item(),
    }
