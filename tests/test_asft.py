"""AsFT post-hoc projection: projector algebra, closed forms against direct solves, LoRA form."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from deltafix.methods.asft import AsftParams, alignment_operator
from deltafix.methods.projectors import exact_projector, truncation_rank
from deltafix.methods.registry import WeightTensors, get_method


def orthonormal(n: int, r: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return q


def v_with_spectrum(out: int, inp: int, sigma: list[float], seed: int) -> torch.Tensor:
    """A (out, in) fp32 matrix with exactly the given singular values."""
    gen = torch.Generator().manual_seed(seed)
    r = len(sigma)
    u, w = orthonormal(out, r, gen), orthonormal(inp, r, gen)
    return (u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ w.T).float()


def dense(op, out: int) -> torch.Tensor:
    """The (out, out) matrix of an operator, only for checks on small shapes."""
    return op.apply(torch.eye(out)).double()


def exact_p64(v: torch.Tensor, k: int) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(v.double(), full_matrices=False)
    return u[:, :k] @ u[:, :k].T


def reference_c64(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return v @ v.T / torch.linalg.vector_norm(v)


def normal_equation_solution(p: torch.Tensor, delta: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin ‖X − δ‖² + λ‖(I − P)X‖² by a dense fp64 solve of (I + λ(I−P)ᵀ(I−P)) X = δ."""
    eye = torch.eye(p.shape[0], dtype=torch.float64)
    q = eye - p
    return torch.linalg.solve(eye + lam * q.T @ q, delta.double())


def objective(x: torch.Tensor, delta: torch.Tensor, p: torch.Tensor, lam: float) -> float:
    x, delta = x.double(), delta.double()
    q = torch.eye(p.shape[0], dtype=torch.float64) - p
    return (x - delta).square().sum().item() + lam * (q @ x).square().sum().item()


# σ chosen so that C's eigenvalues σ²/‖V‖_F ≈ (1.17, 0.52, 0.19, 0.05) straddle 1.
SIGMA = [1.5, 1.0, 0.6, 0.3]
OUT, IN = 12, 9


@pytest.fixture()
def v() -> torch.Tensor:
    return v_with_spectrum(OUT, IN, SIGMA, seed=0)


@pytest.fixture()
def delta() -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1))


def test_exact_projector_is_symmetric_idempotent_of_rank_k(v):
    p = dense(exact_projector(v, 3), OUT)
    assert torch.allclose(p, p.T, atol=1e-6)
    assert torch.allclose(p @ p, p, atol=1e-6)
    assert math.isclose(torch.trace(p).item(), 3.0, abs_tol=1e-5)
    assert torch.allclose(p, exact_p64(v, 3), atol=1e-6)


@pytest.mark.parametrize("projector", ["exact", "reference"])
def test_lam_zero_returns_delta(v, delta, projector):
    x = alignment_operator(v, lam=0.0, projector=projector, rank=2).apply(delta)
    assert torch.allclose(x, delta, atol=1e-6)


def test_lam_inf_exact_is_the_hard_projection(v, delta):
    x = alignment_operator(v, lam=math.inf, projector="exact", rank=2).apply(delta)
    assert torch.allclose(x.double(), exact_p64(v, 2) @ delta.double(), atol=1e-5)


@pytest.mark.parametrize("projector", ["exact", "reference"])
@pytest.mark.parametrize("lam", [0.3, 2.0, 25.0])
def test_closed_form_minimises_the_penalised_objective(v, delta, projector, lam):
    p = exact_p64(v, 2) if projector == "exact" else reference_c64(v)
    x = alignment_operator(v, lam=lam, projector=projector, rank=2).apply(delta)
    assert torch.allclose(x.double(), normal_equation_solution(p, delta, lam), atol=1e-5)
    gen = torch.Generator().manual_seed(2)
    best = objective(x, delta, p, lam)
    for _ in range(5):
        nudge = 1e-2 * torch.randn(OUT, IN, generator=gen)
        assert best < objective(x + nudge, delta, p, lam)


@pytest.mark.parametrize("lam", [0.5, 4.0])
def test_factored_application_equals_the_dense_formulas(v, delta, lam):
    p = exact_p64(v, 3)
    eye = torch.eye(OUT, dtype=torch.float64)
    d = delta.double()
    exact = alignment_operator(v, lam=lam, projector="exact", rank=3).apply(delta)
    assert torch.allclose(exact.double(), p @ d + (eye - p) @ d / (1 + lam), atol=1e-5)
    c = reference_c64(v)
    ref = alignment_operator(v, lam=lam, projector="reference").apply(delta)
    expected = torch.linalg.inv(eye + lam * (eye - c) @ (eye - c)) @ d
    assert torch.allclose(ref.double(), expected, atol=1e-5)


def test_reference_hard_limit_keeps_only_unit_eigenvalue_directions(delta):
    # σ1² = ‖V‖_F exactly when σ1² = φ (golden ratio) and σ2 = 1: C has eigenvalues 1 and 1/φ.
    phi = (1 + math.sqrt(5)) / 2
    v = v_with_spectrum(OUT, IN, [math.sqrt(phi), 1.0], seed=3)
    u1 = torch.linalg.svd(v.double(), full_matrices=False)[0][:, :1]
    hard = alignment_operator(v, lam=math.inf, projector="reference").apply(delta)
    assert torch.allclose(hard.double(), u1 @ (u1.T @ delta.double()), atol=1e-5)
    large = alignment_operator(v, lam=1e7, projector="reference").apply(delta)
    assert torch.allclose(large, hard, atol=1e-4)

    generic = v_with_spectrum(OUT, IN, SIGMA, seed=4)
    assert alignment_operator(generic, lam=math.inf, projector="reference").apply(delta).abs().max() == 0


def test_rank_fraction_picks_the_smallest_k_holding_that_energy():
    v = v_with_spectrum(8, 6, [2.0, math.sqrt(3.0), math.sqrt(2.0), 1.0], seed=5)  # σ² = 4, 3, 2, 1
    s = torch.linalg.svdvals(v)
    for share, k in [(0.35, 1), (0.45, 2), (0.65, 2), (0.75, 3), (0.85, 3), (0.95, 4)]:
        assert truncation_rank(s, share, (8, 6)) == k
        assert alignment_operator(v, lam=1.0, rank=share).basis.shape[1] == k
    assert truncation_rank(s, 3, (8, 6)) == 3
    assert truncation_rank(s, 50, (8, 6)) == 4  # capped at the numerical rank


def test_zero_alignment_direction_shrinks_everything(delta):
    zero = torch.zeros(OUT, IN)
    for projector in ("exact", "reference"):
        x = alignment_operator(zero, lam=3.0, projector=projector).apply(delta)
        assert torch.allclose(x, delta / 4.0, atol=1e-6)


@pytest.mark.parametrize("projector", ["exact", "reference"])
def test_lora_factored_form_equals_dense(v, projector):
    gen = torch.Generator().manual_seed(6)
    b, a, s = torch.randn(OUT, 3, generator=gen), torch.randn(3, IN, generator=gen), 2.0
    op = alignment_operator(v, lam=1.5, projector=projector, rank=2)
    assert torch.allclose(op.apply(s * b @ a), op.apply(s * b) @ a, atol=1e-5)


def test_params_validate_lam_rank_and_keys():
    assert AsftParams(lam="inf").lam == math.inf
    assert AsftParams(rank=16).rank == 16 and isinstance(AsftParams(rank=16).rank, int)
    assert AsftParams(rank="0.5").rank == 0.5
    for bad in ({"lam": -1.0}, {"rank": 0}, {"rank": 1.5}, {"projector": "pseudo"}, {"alpha": 1}):
        with pytest.raises(ValidationError):
            AsftParams(**bad)


def test_registry_repair(v, delta):
    method = get_method("asft")
    assert method.needs_unaligned and method.keeps_low_rank
    gen = torch.Generator().manual_seed(7)
    aligned = torch.randn(OUT, IN, generator=gen)
    weight = WeightTensors("m.q_proj.weight", aligned, aligned + delta, aligned - v, is_linear=True)
    params = AsftParams(lam=2.0, projector="exact", rank=2)
    out = method.repair(weight, params, None)
    expected = aligned.double() + normal_equation_solution(exact_p64(v, 2), delta, 2.0)
    assert torch.allclose(out.tensor.double(), expected, atol=1e-5)
    assert out.stats["rank"] == 2 and out.stats["delta_norm_after"] < out.stats["delta_norm"]

    assert torch.equal(method.repair(weight, AsftParams(lam=0.0), None).tensor, weight.finetuned)
    norm = WeightTensors("m.norm.weight", aligned[0], aligned[0] + 1, aligned[0] - 1)
    assert torch.equal(method.repair(norm, params, None).tensor, norm.finetuned)
    as_aligned = AsftParams(other_params="aligned")
    assert torch.equal(method.repair(norm, as_aligned, None).tensor, norm.aligned)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("projector", ["exact", "reference"])
def test_cuda_matches_cpu(v, delta, projector):
    cpu = alignment_operator(v, lam=2.0, projector=projector, rank=0.8).apply(delta)
    op = alignment_operator(v.cuda(), lam=2.0, projector=projector, rank=0.8)
    assert op.basis.is_cuda
    assert torch.allclose(op.apply(delta.cuda()).cpu(), cpu, atol=1e-5)
