"""RESTA and DARE: no-op settings, the formula, seeded reproducibility and DARE's statistics."""

from __future__ import annotations

import pytest
import torch

from deltafix.methods.registry import WeightTensors, get_method
from deltafix.methods.resta import RestaParams, dare, tensor_generator


def weight(name: str = "model.layers.0.self_attn.q_proj.weight", seed: int = 0) -> WeightTensors:
    gen = torch.Generator().manual_seed(seed)
    aligned, finetuned, unaligned = (torch.randn(32, 16, generator=gen) for _ in range(3))
    # a signed zero where θ_A − θ_P > 0: -0.0 + 0·(θ_A − θ_P) would come out as +0.0
    aligned[0, 0], unaligned[0, 0], finetuned[0, 0] = 1.0, 0.0, -0.0
    return WeightTensors(name, aligned, finetuned, unaligned, is_linear=True)


def repair(w: WeightTensors, **params) -> torch.Tensor:
    return get_method("resta").repair(w, RestaParams(**params), None).tensor


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def test_scale_zero_without_dare_returns_finetuned_bit_identical():
    w = weight()
    assert torch.equal(bits(repair(w, scale=0.0, dare=0.0)), bits(w.finetuned))


@pytest.mark.parametrize("scale", [0.2, 0.5, 1.0])
def test_output_is_finetuned_plus_scaled_alignment(scale):
    w = weight()
    expected = w.finetuned.double() + scale * (w.aligned.double() - w.unaligned.double())
    assert torch.allclose(repair(w, scale=scale).double(), expected, rtol=0, atol=1e-6)


def test_dare_entries_are_dropped_or_rescaled():
    w, p, b = weight(), 0.3, 0.5
    out = repair(w, scale=b, dare=p, seed=1).double()
    base = w.aligned.double() + b * (w.aligned.double() - w.unaligned.double())
    dropped = torch.isclose(out, base, atol=1e-6)
    kept = torch.isclose(out, base + w.delta.double() / (1 - p), atol=1e-6)
    assert bool((dropped | kept).all())
    assert 0 < int(dropped.sum()) < out.numel()


def test_dare_is_reproducible_per_seed_and_name():
    w = weight()
    first, again = repair(w, dare=0.5, seed=7), repair(w, dare=0.5, seed=7)
    assert torch.equal(first, again)
    assert not torch.equal(first, repair(w, dare=0.5, seed=8))
    renamed = WeightTensors("model.layers.1.self_attn.q_proj.weight", w.aligned, w.finetuned, w.unaligned)
    assert not torch.equal(first, repair(renamed, dare=0.5, seed=7))


def test_dare_drops_about_p_of_the_entries():
    delta = torch.ones(400, 250)
    for p in (0.1, 0.5, 0.9):
        dropped = (dare(delta, p, tensor_generator(0, f"drop-{p}")) == 0).float().mean().item()
        assert dropped == pytest.approx(p, abs=0.01)  # sd ≈ 0.0016 at 100k entries


def test_dare_is_unbiased():
    gen = torch.Generator().manual_seed(11)
    delta = torch.randn(64, generator=gen)
    draws = 4000
    mean = dare(delta.expand(draws, -1).contiguous(), 0.5, tensor_generator(3, "unbiased")).mean(0)
    # each entry's mean has sd |δ|·sqrt(p/(1−p)/draws) ≈ 0.016|δ|; allow 5 sd
    assert torch.all((mean - delta).abs() <= 0.08 * delta.abs() + 1e-6)


def test_dare_zero_is_the_identity():
    delta = torch.randn(5, 5)
    assert dare(delta, 0.0, tensor_generator(0, "x")) is delta
