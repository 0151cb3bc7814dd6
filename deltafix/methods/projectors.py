"""Operators built from the alignment direction ``V = W_A − W_P`` of one weight (DESIGN §5.2, §5.3).

Every operator here acts on the output dimension of a weight: ``M`` is (out, out) in the math,
but it is kept in factored form and only ever applied as ``M @ m`` for an (out, n) matrix ``m``
(a weight delta with n = in, or a LoRA ``B`` with n = r). Nothing builds an (out, out) matrix;
the largest factor is (out, min(out, in)).

Two shapes of operator cover both methods:
- ``SpectralOperator``: ``M = rest·I + U diag(gains − rest) Uᵀ`` with orthonormal columns U.
  The exact projector ``P_k = U_k U_kᵀ``, the AsFT closed forms and Safe LoRA's exact projector
  are all of this shape.
- ``GramProjector``: the reference ``C = V Vᵀ / ‖V‖_F`` of Safe LoRA and AsFT, applied as
  ``V (Vᵀ m) / ‖V‖_F`` with no decomposition at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class AlignmentOperator(Protocol):
    """A symmetric (out, out) operator applied from the left; see the module docstring."""

    def apply(self, m: torch.Tensor) -> torch.Tensor:
        """``M @ m`` for ``m`` of shape (out, n) on the operator's device; fp32 (out, n)."""
        ...


@dataclass(frozen=True)
class SpectralOperator:
    """``M = rest·I + U diag(gains − rest) Uᵀ``: ``gains`` on span(U), ``rest`` on its complement.

    ``basis`` U is (out, r) with orthonormal columns, ``gains`` (r,), both fp32 on one device.
    """

    basis: torch.Tensor
    gains: torch.Tensor
    rest: float

    def apply(self, m: torch.Tensor) -> torch.Tensor:
        m = m.to(self.basis.dtype)
        coeff = self.basis.T @ m
        coeff *= (self.gains - self.rest).unsqueeze(1)
        out = self.basis @ coeff
        if self.rest != 0.0:
            out.add_(m, alpha=self.rest)
        return out


@dataclass(frozen=True)
class GramProjector:
    """The reference ``C = V Vᵀ / ‖V‖_F`` (Safe LoRA's code): ``V`` (out, in) fp32.

    C is symmetric PSD with eigenvalues ``σ_i² / ‖V‖_F`` on V's left singular vectors and 0 on
    their complement. Those eigenvalues are not 1 (and may exceed 1), so C is not a projector:
    it scales with ‖V‖ (``C(tV) = t·C(V)``). A zero V gives C = 0.
    """

    v: torch.Tensor

    def apply(self, m: torch.Tensor) -> torch.Tensor:
        m = m.to(self.v.dtype)
        norm = torch.linalg.vector_norm(self.v)
        if norm == 0:
            return torch.zeros_like(m)
        return self.v @ (self.v.T @ m) / norm


def left_singular(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors U (out, r) and singular values σ (r,), descending, r = min(out, in).

    fp32 SVD on v's device. If the device solver raises (no convergence, out of memory), the
    SVD is redone on the CPU and the factors are moved back, so a repair never fails on it.
    """
    v = v.float()
    try:
        u, s, _ = torch.linalg.svd(v, full_matrices=False)
    except RuntimeError:
        if v.device.type == "cpu":
            raise
        u, s, _ = torch.linalg.svd(v.cpu(), full_matrices=False)
        u, s = u.to(v.device), s.to(v.device)
    return u, s


def numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """Number of singular values above ``σ_max · max(out, in) · eps(fp32)`` (as ``matrix_rank``).

    Left singular vectors of smaller singular values are arbitrary directions of the null space,
    so no projector includes them.
    """
    if s.numel() == 0:
        return 0
    tol = s[0] * max(shape) * torch.finfo(torch.float32).eps
    return int((s > tol).sum().item())


def truncation_rank(s: torch.Tensor, rank: int | float, shape: tuple[int, int]) -> int:
    """k of ``P_k`` for descending singular values ``s`` of a (out, in) V.

    ``rank`` is either k itself (int >= 1) or a share f in (0, 1): the smallest k with
    ``Σ_{i<=k} σ_i² >= f · Σ σ²`` (energy summed in fp64). Either way k is capped at the
    numerical rank of V, so a zero V gives k = 0.
    """
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        k = rank
    else:
        if not 0.0 < rank < 1.0:
            raise ValueError(f"a fractional rank must lie in (0, 1), got {rank}")
        energy = torch.cumsum(s.double() ** 2, dim=0)
        target = torch.tensor([rank], dtype=energy.dtype, device=energy.device) * energy[-1]
        k = int(torch.searchsorted(energy, target).item()) + 1
    return min(k, numerical_rank(s, shape))


def exact_projector(v: torch.Tensor, rank: int | float | None = None) -> SpectralOperator:
    """``P_k = U_k U_kᵀ`` onto the top-k left singular vectors of V (out, in).

    ``rank`` None means the whole column space of V (k = its numerical rank); otherwise see
    ``truncation_rank``. Note that a full-rank V with out <= in spans all of R^out, so then P = I.
    """
    u, s = left_singular(v)
    k = numerical_rank(s, tuple(v.shape)) if rank is None else truncation_rank(s, rank, tuple(v.shape))
    basis = u[:, :k].contiguous()
    return SpectralOperator(basis, torch.ones(k, dtype=basis.dtype, device=basis.device), 0.0)


def reference_eigen(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenbasis of the reference ``C = V Vᵀ / ‖V‖_F``: U (out, r) and eigenvalues ``σ_i² / ‖V‖_F``.

    C is 0 on the orthogonal complement of span(U). A zero V gives all-zero eigenvalues.
    """
    u, s = left_singular(v)
    norm = torch.linalg.vector_norm(v.float())
    eig = s**2 / norm if norm > 0 else torch.zeros_like(s)
    return u, eig
