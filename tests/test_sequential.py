"""Layer-sequential solve: which inputs each weight's Grams come from, checked against independent captures."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from deltafix.errors import OptionError
from deltafix.calibration.capture import capture_hessians
from deltafix.methods.registry import ShiftedGrams
from deltafix.engine.sequential import solve_sequentially

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _samples(seed: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g) for _ in range(n)]


def _hessians(folder, samples) -> dict[str, torch.Tensor]:
    return {name: h for layer in capture_hessians(folder, samples) for name, h in layer.hessians.items()}


def _head_gram(folder, samples) -> torch.Tensor:
    """(2/N) Σ xᵀx of the lm_head's inputs, from a plain forward of the whole model."""
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    gram = torch.zeros(32, 32)
    model.lm_head.register_forward_pre_hook(lambda _m, args: gram.add_(args[0][0].T @ args[0][0]))
    with torch.no_grad():
        for ids in samples:
            model(input_ids=ids[None])
    return gram * 2 / len(samples)


def _solve(trio, keep_role: str, keep: str, safety, user):
    """Solve with a rule that returns ``keep_role``'s own weight; record every call's Grams in order."""
    calls: list[ShiftedGrams] = []

    def solve(w_a: torch.Tensor, w_f: torch.Tensor, grams: ShiftedGrams) -> torch.Tensor:
        calls.append(grams)
        return (w_a if keep_role == "A" else w_f).clone()

    solved = solve_sequentially(trio["A"], trio["F"], safety, user, solve, keep=keep)
    return solved, dict(zip(solved.names, calls))


@pytest.mark.parametrize("role,keep", [("A", "aligned"), ("F", "finetuned")])
def test_a_repair_equal_to_one_model_sees_that_models_inputs(trio, role: str, keep: str) -> None:
    """If every solved weight is A's (F's) and the rest is kept from A (F), R is A (F): its Grams on
    both data sets are that model's independent Hessians, in forward order, for every Linear and
    the head, and the embedding's are the token counts. The cross Grams use the other model's
    inputs where the target is the other model (F on the user data for R = A, A on the safety data
    for R = F), so they differ there and agree elsewhere."""
    safety, user = _samples(0, 6), _samples(1, 9)
    solved, grams = _solve(trio, role, keep, safety, user)
    try:
        weights = load_file(str(trio[role] / "model.safetensors"))
        assert list(grams)[0] == EMBED and list(grams)[-1] == HEAD
        assert [n.split(".")[-2] for n in list(grams)[1:8]] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"]
        assert len(grams) == 1 + 2 * 7 + 1
        for name in grams:
            assert torch.equal(solved.get(name), weights[name])
        h_s, h_u = _hessians(trio[role], safety), _hessians(trio[role], user)
        same, other = ("safety", "utility") if role == "A" else ("utility", "safety")
        for name, g in grams.items():
            if name == EMBED:
                counts = torch.bincount(torch.cat(safety), minlength=64).float() * 2 / len(safety)
                assert torch.allclose(g.safety, counts) and torch.equal(g.safety_cross, g.safety)
                continue
            expected = {"safety": _head_gram(trio[role], safety) if name == HEAD else h_s[name],
                        "utility": _head_gram(trio[role], user) if name == HEAD else h_u[name]}
            for kind in ("safety", "utility"):
                assert torch.allclose(getattr(g, kind), expected[kind], rtol=1e-4, atol=1e-5), (name, kind)
            assert torch.allclose(getattr(g, f"{same}_cross"), expected[same], rtol=1e-4, atol=1e-5)
            assert not torch.allclose(getattr(g, f"{other}_cross"), expected[other], rtol=1e-2, atol=1e-3)
    finally:
        solved.close()


def test_later_weights_see_the_solved_earlier_ones(trio) -> None:
    """Solving layer 0 as A's while keeping F everywhere else changes what layer 1 sees: its safety
    Grams move from F's inputs towards A's, which they equal only when everything is A's."""
    safety, user = _samples(2, 5), _samples(3, 5)
    calls: dict[str, ShiftedGrams] = {}

    def solve(w_a: torch.Tensor, w_f: torch.Tensor, grams: ShiftedGrams) -> torch.Tensor:
        calls[str(len(calls))] = grams
        return w_a.clone() if len(calls) <= 8 else w_f.clone()  # embedding and layer 0 from A

    solved = solve_sequentially(trio["A"], trio["F"], safety, user, solve, keep="finetuned")
    solved.close()
    layer1_q = calls["8"]  # embedding, 7 Linears of layer 0, then layer 1's q_proj
    h_f = _hessians(trio["F"], safety)["model.layers.1.self_attn.q_proj.weight"]
    h_a = _hessians(trio["A"], safety)["model.layers.1.self_attn.q_proj.weight"]
    assert (layer1_q.safety - h_a).norm() < (h_f - h_a).norm()
    assert not torch.allclose(layer1_q.safety, h_f, rtol=1e-3, atol=1e-4)


def test_empty_data_is_refused(trio) -> None:
    with pytest.raises(OptionError, match="safety and user"):
        solve_sequentially(trio["A"], trio["F"], [], _samples(0, 2), lambda a, f, g: a, keep="aligned")
