"""Safe LoRA: cosines against dense fp64 formulas, exact selection rules, repair, LoRA form."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from deltafix.methods.registry import WeightTensors, get_method
from deltafix.methods.safelora import (
    SafeLoraParams,
    delta_cosine,
    lora_cosine,
    projection_operator,
    select_modules,
)

OUT, IN = 10, 6  # tall, so the exact projector onto V's column space is not I


def dense_projector(v: torch.Tensor, projector: str) -> torch.Tensor:
    v = v.double()
    if projector == "reference":
        return v @ v.T / torch.linalg.vector_norm(v)
    u, _, _ = torch.linalg.svd(v, full_matrices=False)
    return u @ u.T


def dense_cosine(v: torch.Tensor, delta: torch.Tensor, projector: str) -> float:
    cd = dense_projector(v, projector) @ delta.double()
    return torch.nn.functional.cosine_similarity(cd.flatten(), delta.double().flatten(), dim=0).item()


def make_weights(count: int = 8, seed: int = 0) -> list[WeightTensors]:
    """Linear weights whose deltas mix V's column space and noise in varying shares."""
    gen = torch.Generator().manual_seed(seed)
    weights = []
    for i in range(count):
        aligned = torch.randn(OUT, IN, generator=gen)
        v = torch.randn(OUT, IN, generator=gen)
        along = v @ torch.randn(IN, IN, generator=gen)
        noise = torch.randn(OUT, IN, generator=gen)
        mix = i / (count - 1)
        delta = (1 - mix) * along / along.norm() + mix * noise / noise.norm()
        name = f"model.layers.{i}.mlp.up_proj.weight"
        weights.append(WeightTensors(name, aligned, aligned + delta, aligned - v, is_linear=True))
    return weights


@pytest.mark.parametrize("projector", ["reference", "exact"])
def test_delta_cosine_matches_dense(projector):
    for w in make_weights():
        v = w.aligned - w.unaligned
        got = delta_cosine(projection_operator(v, projector), w.delta)
        assert got == pytest.approx(dense_cosine(v, w.delta, projector), abs=1e-5)


@pytest.mark.parametrize("projector", ["reference", "exact"])
def test_number_mode_selects_exactly_the_k_lowest(projector):
    weights = make_weights()
    expected = {w.name: dense_cosine(w.aligned - w.unaligned, w.delta, projector) for w in weights}
    lowest = sorted(expected, key=expected.get)
    assert expected[lowest[3]] - expected[lowest[2]] > 1e-3  # a clear gap at the cut
    params = SafeLoraParams(select="number", k=3, projector=projector)
    state = get_method("safelora").survey(iter(weights), params)
    assert state.selected == frozenset(lowest[:3])
    assert set(state.cosines) == set(expected)


def test_number_mode_breaks_ties_by_name_and_caps_at_all_modules():
    cosines = {"b": 0.2, "a": 0.2, "c": 0.1, "d": 0.9}
    assert select_modules(cosines, SafeLoraParams(k=2)) == {"c", "a"}
    assert select_modules(cosines, SafeLoraParams(k=10)) == set(cosines)
    assert select_modules(cosines, SafeLoraParams(k=0)) == frozenset()


def test_threshold_mode_selects_exactly_those_at_or_below():
    weights = make_weights()
    probe = SafeLoraParams(select="threshold", threshold=0.0)
    cosines = get_method("safelora").survey(weights, probe).cosines
    threshold = sorted(cosines.values())[4]  # a value that is hit exactly: "≤" must include it
    params = SafeLoraParams(select="threshold", threshold=threshold)
    state = get_method("safelora").survey(weights, params)
    assert state.selected == {name for name, cos in cosines.items() if cos <= threshold}
    assert len(state.selected) == 5


@pytest.mark.parametrize("projector", ["reference", "exact"])
def test_repair_projects_selected_modules_only(projector):
    method = get_method("safelora")
    weights = make_weights()
    params = SafeLoraParams(k=3, projector=projector)
    state = method.survey(weights, params)
    for w in weights:
        out = method.repair(w, params, state)
        assert out.stats["cosine"] == state.cosines[w.name]
        if w.name in state.selected:
            expected = w.aligned.double() + dense_projector(w.aligned - w.unaligned, projector) @ w.delta.double()
            assert out.stats["projected"] == 1.0
            assert torch.allclose(out.tensor.double(), expected, atol=1e-5)
        else:
            assert out.stats["projected"] == 0.0
            assert torch.equal(out.tensor, w.finetuned)
    norm = WeightTensors("model.norm.weight", torch.ones(OUT), torch.full((OUT,), 2.0), torch.zeros(OUT))
    assert torch.equal(method.repair(norm, params, state).tensor, norm.finetuned)


@pytest.mark.parametrize("projector", ["reference", "exact"])
def test_lora_factored_form_equals_dense(projector):
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(OUT, IN, generator=gen)
    b, a, s = torch.randn(OUT, 2, generator=gen), torch.randn(2, IN, generator=gen), 4.0
    op = projection_operator(v, projector)
    assert lora_cosine(op, b, a) == pytest.approx(dense_cosine(v, s * b @ a, projector), abs=1e-5)
    assert lora_cosine(op, b, a) == pytest.approx(delta_cosine(op, s * b @ a), abs=1e-5)
    assert torch.allclose(op.apply(s * b @ a), op.apply(s * b) @ a, atol=1e-5)


def test_cosine_conventions_for_degenerate_deltas():
    gen = torch.Generator().manual_seed(4)
    v = torch.randn(OUT, IN, generator=gen)
    q, _ = torch.linalg.qr(v)
    orthogonal = (torch.eye(OUT) - q @ q.T) @ torch.randn(OUT, IN, generator=gen)
    for projector in ("reference", "exact"):
        op = projection_operator(v, projector)
        assert delta_cosine(op, torch.zeros(OUT, IN)) == 1.0
        assert abs(delta_cosine(op, orthogonal)) < 1e-5


def test_exact_projector_is_identity_for_full_rank_square_weights():
    gen = torch.Generator().manual_seed(5)
    v, delta = torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)
    assert delta_cosine(projection_operator(v, "exact"), delta) == pytest.approx(1.0, abs=1e-6)


def test_params_validate():
    assert SafeLoraParams().model_dump() == {
        "select": "number", "k": 10, "threshold": 0.5, "projector": "reference", "target_asr": 0.05,
        "target_from": "aligned",
        "tune_prompts": None,
    }
    assert SafeLoraParams(k="auto").k == "auto"
    for bad in ({"select": "top"}, {"k": -1}, {"threshold": 2.0}, {"projector": "p"}, {"rank": 3}):
        with pytest.raises(ValidationError):
            SafeLoraParams(**bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("projector", ["reference", "exact"])
def test_cuda_matches_cpu(projector):
    method = get_method("safelora")
    weights = make_weights()
    on_cuda = [
        WeightTensors(w.name, w.aligned.cuda(), w.finetuned.cuda(), w.unaligned.cuda(), is_linear=True)
        for w in weights
    ]
    params = SafeLoraParams(k=3, projector=projector)
    cpu, gpu = method.survey(weights, params), method.survey(on_cuda, params)
    assert cpu.selected == gpu.selected
    for w, wc in zip(weights, on_cuda):
        assert cpu.cosines[w.name] == pytest.approx(gpu.cosines[w.name], abs=1e-5)
        out = method.repair(wc, params, gpu).tensor
        assert out.is_cuda
        assert torch.allclose(out.cpu(), method.repair(w, params, cpu).tensor, atol=1e-5)
