"""Safety/utility RegMean: end points in μ, the minimiser of the stated objective, the registry entry."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from deltafix.errors import OptionError
from deltafix.methods import WeightTensors, get_method
from deltafix.methods.regmean import RegMeanParams, regmean_merge

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
    with pytest.raises(OptionError, match="damp"):
        regmean_merge(w_aligned, w_finetuned, -torch.eye(IN), torch.eye(IN), mu=0.5)


def test_params() -> None:
    assert RegMeanParams().mu == 1.0
    assert RegMeanParams(mu="auto").mu == "auto"
    assert RegMeanParams().other_params == "finetuned"
    for bad in [{"mu": 0.0}, {"mu": -1.0}, {"mu": "max"}, {"damp": -0.1}, {"other_params": "p"}]:
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
