"""Truncated SVD of a weight delta into LoRA factors: the maths of ``repair --as-lora``.

A pure function on tensors, like the methods: ``δ ≈ B A`` with ``B = U_r S_r^½`` and
``A = S_r^½ V_rᵀ``, splitting the singular values evenly so both factors have similar norms (as
mergekit's LoRA extraction does), and scaling 1 so the adapter's config sets ``lora_alpha = r``.
"""

from __future__ import annotations

import torch


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A (r, in), B (out, r), ‖δ − B A‖_F / ‖δ‖_F)`` for the fp32 (out, in) ``delta``.

    ``r`` is ``rank`` capped at ``min(out, in)``, where the factorisation is exact. The exact
    thin SVD (``torch.linalg.svd``), not the randomized ``torch.svd_lowrank``: it is the best
    rank-r approximation (Eckart–Young), so the reported error is the least any rank-r adapter
    can reach, and it is deterministic, so a recipe rerun writes the same factors. It costs one
    thin SVD per Linear on the compute device (seconds per 4096×11008 matrix on a GPU). The
    error of a zero delta is 0: nothing is lost.
    """
    delta = delta.float()
    r = min(rank, *delta.shape)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    root = S[:r].sqrt()
    B = U[:, :r] * root
    A = root[:, None] * Vh[:r]
    norm = torch.linalg.matrix_norm(delta)
    error = float(torch.linalg.matrix_norm(delta - B @ A) / norm) if norm > 0 else 0.0
    return A, B, error
