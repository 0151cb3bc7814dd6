"""Bisection over a log grid finds the last passing value with few probes."""

from __future__ import annotations

import math

import pytest
import torch

from deltafix.methods.search import largest_passing, log_grid


def test_log_grid_endpoints_and_density() -> None:
    grid = log_grid(0.01, 100.0, 4)
    assert len(grid) == 17
    assert grid[0] == pytest.approx(0.01) and grid[-1] == pytest.approx(100.0)
    assert grid[4] == pytest.approx(0.1)


@pytest.mark.parametrize("threshold", [0.013, 0.5, 3.3, 99.0])
def test_finds_largest_passing_value(threshold: float) -> None:
    grid = log_grid(0.01, 100.0, 4)
    result = largest_passing(grid, lambda v: (v <= threshold, v))
    assert result.value == max(v for v in grid if v <= threshold)
    assert len(result.probes) <= math.ceil(math.log2(len(grid))) + 2


def test_all_fail_and_all_pass() -> None:
    grid = log_grid(1.0, 10.0, 2)
    assert largest_passing(grid, lambda v: (False, 1.0)).value is None
    assert largest_passing(grid, lambda v: (True, 0.0)).value == grid[-1]


def test_category_gap_measures_how_much_more_unseen_topics_are_answered() -> None:
    from deltafix.engine.autotune import category_gap

    categories = ["a", "a", "b", "b", "c", "c", "d", "d"]
    # safest value first: answers nothing; the second answers one prompt of every category but b's both
    outcomes = [[False] * 8, [True, False, True, True, True, False, True, False]]
    # leaving out a, c or d: the rest's rate is 4/6 > target, so the safe value is picked (gap 0);
    # leaving out b: the rest answers 3/6 > 0.4 too. All pick the first: the gap is 0.
    assert category_gap(outcomes, categories, 0.4) == 0.0
    # at target 0.5 only "leave out b" picks the second value: b answers 2/2 against 3/6 elsewhere
    assert category_gap(outcomes, categories, 0.5) == pytest.approx((1.0 - 0.5) / 4)
    assert category_gap(outcomes, ["a", "a", "b", "b", None, None, None, None], 0.5) is None


def _style_bound_harm(styles: list[str | None]):
    """A stand-in for RESTA on the real testbed: each prompt is answered below a scale of its own;
    the short requests need a larger b than the others (3 against 1)."""
    from deltafix.engine.autotune import TuneSet
    from deltafix.methods import get_method

    method = get_method("resta")
    params = method.params(scale="auto", target_asr=0.05, target_from="zero")
    needs = [3.0 if style == "short" else 1.0 for style in styles]
    tune = TuneSet([f"p{i}" for i in range(len(styles))], [None] * len(styles), styles)
    model = torch.nn.Linear(1, 1, bias=False)

    def repaired(p) -> dict[str, torch.Tensor]:
        return {"weight": torch.tensor([[float(p.scale)]])}

    def asr_of(m: torch.nn.Module, prompts: list[str]) -> list[bool]:
        scale = m.weight.item()
        return [scale < need for need in needs]

    return method, params, model, repaired, tune, asr_of


@pytest.mark.parametrize("labelled", [True, False])
def test_auto_meets_the_target_in_each_style_of_asking(labelled: bool) -> None:
    """10 % of the prompts are short and answered until b = 3: on average that meets a 0.15
    target at b >= 1, but with styles labelled every style must meet it, so b >= 3."""
    from deltafix.engine.autotune import autotune

    styles = ["short"] * 2 + ["plain"] * 18
    method, params, model, repaired, tune, asr_of = _style_bound_harm(styles if labelled else [None] * 20)
    params = params.model_copy(update={"target_asr": 0.15})
    chosen, record = autotune(method, params, model, repaired, tune, asr_of)
    assert record["met_target"]
    if labelled:
        assert chosen.scale >= 3.0 and "each style" in record["how"]
        assert record["style_targets"] == {"plain": 0.15, "short": 0.15}
    else:
        assert 1.0 <= chosen.scale < 3.0
