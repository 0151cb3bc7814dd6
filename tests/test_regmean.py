"""Safety/utility RegMean: end points in μ, the minimiser of the stated objective, the registry entry."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from deltafix.errors import InputError, OptionError
from deltafix.methods import WeightTensors, get_method
from deltafix.methods.registry import ShiftedGrams
from deltafix.methods.regmean import RegMeanParams, regmean_merge, regmean_merge_shifted
from deltafix.engine.sequential import SolvedWeights

OUT, IN = 48, 64


@pytest.fixture
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_A, W_F (OUT, IN) and full-rank Grams H_s, H_u (IN, IN) of different input sets."""
    g = torch.Generator().manual_seed(0)
    X_s = torch.randn(256, IN, generator=g) @ torch.randn(IN, IN, generator=g) / IN**0.5
    X_u = torch.randn(256, IN, generator=g) + torch.randn(IN, generator=g)
    w_aligned = 0.02 * torch.randn(OUT, IN, generator=g)
    w_finetuned = w_aligned + 0.002 * torch.randn(OUT, IN, generator=g)
    return w_aligned, w_finetuned, 2 / 256 * X_s.T @ X_s, 2 / 256 * X_u.T @ X_u


def normal_equations_solution(w_aligned, w_finetuned, H_s, H_u, mu, damp) -> torch.Tensor:
    """Row by row in float64: the stationary point of
    (w − w_A)ᵀ H_s (w − w_A) + μ (w − w_F)ᵀ H_u (w − w_F) + λ‖w − w_A‖²."""
    H_s, H_u = H_s.double(), H_u.double()
    ridge = damp * H_s.diagonal().mean() * torch.eye(IN, dtype=torch.float64)
    lhs = H_s + ridge + mu * H_u
    rows = []
    for w_a, w_f in zip(w_aligned.double(), w_finetuned.double()):
        rows.append(torch.linalg.solve(lhs, (H_s + ridge) @ w_a + mu * H_u @ w_f))
    return torch.stack(rows)


def test_mu_zero_gives_aligned(layer) -> None:
    w_aligned, w_finetuned, H_s, H_u = layer
    assert torch.equal(regmean_merge(w_aligned, w_finetuned, H_s, H_u, mu=0.0), w_aligned)


def test_large_mu_gives_finetuned(layer) -> None:
    w_aligned, w_finetuned, H_s, H_u = layer
    merged = regmean_merge(w_aligned, w_finetuned, H_s, H_u, mu=1e6)
    assert torch.allclose(merged, w_finetuned, rtol=0, atol=1e-6)
    assert not torch.allclose(regmean_merge(w_aligned, w_finetuned, H_s, H_u, mu=1.0), w_finetuned, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mu", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_result_minimises_the_stated_objective(layer, mu: float, damp: float) -> None:
    w_aligned, w_finetuned, H_s, H_u = layer
    merged = regmean_merge(w_aligned, w_finetuned, H_s, H_u, mu=mu, damp=damp)
    expected = normal_equations_solution(w_aligned, w_finetuned, H_s, H_u, mu, damp)
    assert torch.allclose(merged.double(), expected, rtol=0, atol=1e-6)


def test_rows_are_independent(layer) -> None:
    w_aligned, w_finetuned, H_s, H_u = layer
    batched = regmean_merge(w_aligned, w_finetuned, H_s, H_u, mu=2.0)
    for i in range(OUT):
        row = regmean_merge(w_aligned[i : i + 1], w_finetuned[i : i + 1], H_s, H_u, mu=2.0)
        assert torch.allclose(row[0], batched[i], rtol=0, atol=1e-6)


def test_indefinite_system_is_a_clear_error(layer) -> None:
    w_aligned, w_finetuned, _, _ = layer
    with pytest.raises(InputError, match="indefinite"):
        regmean_merge(w_aligned, w_finetuned, -torch.eye(IN), torch.eye(IN), mu=0.5)


def test_shifted_merge_with_unshifted_inputs_is_regmean(layer) -> None:
    """When R's inputs are A's on the safety data and F's on the user data, C = G and both forms agree."""
    w_aligned, w_finetuned, H_s, H_u = layer
    for mu, damp in [(0.3, 0.01), (3.0, 0.0)]:
        shifted = regmean_merge_shifted(w_aligned, w_finetuned, ShiftedGrams(H_s, H_s, H_u, H_u), mu=mu, damp=damp)
        assert torch.allclose(shifted, regmean_merge(w_aligned, w_finetuned, H_s, H_u, mu=mu, damp=damp),
                              rtol=0, atol=1e-5)


@pytest.mark.parametrize("mu", [0.5, 4.0])
def test_shifted_merge_minimises_the_stated_objective(layer, mu: float) -> None:
    """Least squares in float64 on stacked rows: the minimiser of
    ‖W X_Rˢ − W_A X_Aˢ‖² + μ ‖W X_Rᵘ − W_F X_Fᵘ‖² + λ ‖W − W_A‖² (rows = tokens, 2/N-scaled)."""
    w_aligned, w_finetuned, _, _ = layer
    g = torch.Generator().manual_seed(1)
    n_s, n_u, damp = 200, 300, 0.05
    X_A = torch.randn(n_s, IN, generator=g)
    X_Rs = X_A + 0.3 * torch.randn(n_s, IN, generator=g)
    X_F = torch.randn(n_u, IN, generator=g) + 0.5
    X_Ru = X_F + 0.3 * torch.randn(n_u, IN, generator=g)
    c_s, c_u = 2 / 10, 2 / 15  # 2/N for 10 safety and 15 user samples
    grams = ShiftedGrams(c_s * X_Rs.T @ X_Rs, c_s * X_A.T @ X_Rs, c_u * X_Ru.T @ X_Ru, c_u * X_F.T @ X_Ru)
    merged = regmean_merge_shifted(w_aligned, w_finetuned, grams, mu=mu, damp=damp)
    lam = damp * float(grams.safety.diagonal().mean())
    W_A, W_F = w_aligned.double(), w_finetuned.double()
    lhs = torch.cat([c_s**0.5 * X_Rs, (mu * c_u) ** 0.5 * X_Ru, lam**0.5 * torch.eye(IN)]).double()
    rhs = torch.cat([c_s**0.5 * X_A.double() @ W_A.T, (mu * c_u) ** 0.5 * X_F.double() @ W_F.T, lam**0.5 * W_A.T])
    expected = torch.linalg.lstsq(lhs, rhs).solution.T
    assert torch.allclose(merged.double(), expected, rtol=0, atol=1e-5)


def test_diagonal_grams_blend_each_input_column(layer) -> None:
    """One-hot inputs (the token embedding): 1-D Grams give the dense solve with diagonal matrices,
    and an input that no data reaches keeps W_A even without damping."""
    w_aligned, w_finetuned, _, _ = layer
    g = torch.Generator().manual_seed(2)
    counts_s, counts_u = torch.rand(IN, generator=g), torch.rand(IN, generator=g)
    counts_s[:5] = 0.0
    counts_u[3:8] = 0.0
    diagonal = ShiftedGrams(counts_s, counts_s, counts_u, counts_u)
    dense = ShiftedGrams(*(torch.diag(c) for c in (counts_s, counts_s, counts_u, counts_u)))
    merged = regmean_merge_shifted(w_aligned, w_finetuned, diagonal, mu=2.0, damp=0.01)
    assert torch.allclose(merged, regmean_merge_shifted(w_aligned, w_finetuned, dense, mu=2.0, damp=0.01),
                          rtol=0, atol=1e-6)
    undamped = regmean_merge_shifted(w_aligned, w_finetuned, diagonal, mu=2.0, damp=0.0)
    assert torch.isfinite(undamped).all()
    assert torch.equal(undamped[:, 3:5], w_aligned[:, 3:5])
    assert torch.allclose(undamped[:, :3], w_finetuned[:, :3], rtol=0, atol=1e-6)
    assert torch.allclose(undamped[:, 5:8], w_aligned[:, 5:8], rtol=0, atol=1e-6)


def test_params() -> None:
    """The code default of mu is the recipe's (issue 19: --method regmean and --recipe do the same)."""
    import yaml

    recipe = yaml.safe_load((Path(__file__).resolve().parent.parent / "deltafix" / "recipes" / "regmean.yaml").read_text())
    assert RegMeanParams().mu == recipe["parameters"]["mu"] == 3.0
    assert RegMeanParams(mu="auto").mu == "auto"
    assert RegMeanParams().other_params == "finetuned"
    assert RegMeanParams().sequential is True
    for bad in [{"mu": 0.0}, {"mu": -1.0}, {"mu": "max"}, {"damp": -0.1}, {"other_params": "p"}, {"sequential": "x"}]:
        with pytest.raises(ValidationError):
            RegMeanParams(**bad)


def test_registry_entry(layer) -> None:
    w_aligned, w_finetuned, H_s, H_u = layer
    method = get_method("regmean")
    assert method.needs_hessian and method.needs_utility
    linear = WeightTensors(
        "up_proj.weight", w_aligned, w_finetuned, is_linear=True, hessian=lambda: H_s, utility_hessian=lambda: H_u
    )
    repaired = method.repair(linear, RegMeanParams(mu=3.0), None)
    assert torch.equal(repaired.tensor, regmean_merge(w_aligned, w_finetuned, H_s, H_u, mu=3.0))
    assert 0 < repaired.stats["delta_norm_after"] < repaired.stats["delta_norm_before"]

    embed = WeightTensors("embed_tokens.weight", w_aligned, w_finetuned)
    assert torch.equal(method.repair(embed, RegMeanParams(), None).tensor, w_finetuned)
    assert torch.equal(method.repair(embed, RegMeanParams(other_params="aligned"), None).tensor, w_aligned)

    with pytest.raises(OptionError, match="auto"):
        method.repair(linear, RegMeanParams(mu="auto"), None)


def test_registry_entry_reads_sequentially_solved_weights(layer) -> None:
    """With a sequential solve as state, repair looks weights up; a Linear the solve never reached
    (it never ran) keeps W_A, other tensors follow other_params."""
    w_aligned, w_finetuned, H_s, H_u = layer
    method = get_method("regmean")
    assert method.sequential is not None and method.sequential.enabled(RegMeanParams())
    assert not method.sequential.enabled(RegMeanParams(sequential=False))
    solved_weight = regmean_merge_shifted(w_aligned, w_finetuned, ShiftedGrams(H_s, H_s, H_u, H_u), mu=2.0)
    assert torch.equal(method.sequential.solve(w_aligned, w_finetuned, ShiftedGrams(H_s, H_s, H_u, H_u),
                                               RegMeanParams(mu=2.0)), solved_weight)
    state = SolvedWeights()
    try:
        state.add("layer_00000", {"up_proj.weight": solved_weight, "lm_head.weight": w_finetuned})
        solved = WeightTensors("up_proj.weight", w_aligned, w_finetuned, is_linear=True)
        assert torch.equal(method.repair(solved, RegMeanParams(), state).tensor, solved_weight)
        head = WeightTensors("lm_head.weight", w_aligned, w_finetuned)
        assert torch.equal(method.repair(head, RegMeanParams(other_params="aligned"), state).tensor, w_finetuned)
        dead = WeightTensors("down_proj.weight", w_aligned, w_finetuned, is_linear=True)
        assert torch.equal(method.repair(dead, RegMeanParams(), state).tensor, w_aligned)
        norm = WeightTensors("norm.weight", w_aligned[0], w_finetuned[0])
        assert torch.equal(method.repair(norm, RegMeanParams(), state).tensor, w_finetuned[0])
        assert torch.equal(method.repair(norm, RegMeanParams(other_params="aligned"), state).tensor, w_aligned[0])
    finally:
        state.close()


def test_badly_conditioned_grams_are_solved_not_refused() -> None:
    """At a large μ the damped Gram is indefinite in fp32 (the ridge is lost to rounding): the
    solve falls back to fp64 and solves the system to fp64 accuracy instead of stopping the repair."""
    gen = torch.Generator().manual_seed(3)
    x_s = torch.randn(4, 32, generator=gen, dtype=torch.float64)
    x_u = torch.randn(3, 32, generator=gen, dtype=torch.float64) * 10
    H_s, H_u = (x_s.T @ x_s).float(), (x_u.T @ x_u).float()
    w_a, w_f = torch.randn(5, 32, generator=gen), torch.randn(5, 32, generator=gen)
    mu, damp = 1000.0, 0.01
    lam = damp * H_s.diagonal().mean()
    M = H_s + mu * H_u
    M.diagonal().add_(lam)
    assert torch.linalg.cholesky_ex(M).info.item() != 0, "the case must really break fp32 Cholesky"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp64 alone must do: no extra damping
        got = regmean_merge(w_a, w_f, H_s, H_u, mu=mu, damp=damp)
    assert torch.isfinite(got).all()
    M64 = H_s.double() + mu * H_u.double() + lam.double() * torch.eye(32, dtype=torch.float64)
    B64 = mu * H_u.double() @ (w_f.double() - w_a.double()).T
    X = (got.double() - w_a.double()).T
    assert torch.linalg.norm(M64 @ X - B64) / torch.linalg.norm(B64) < 1e-5  # fp32 output rounding
