"""Bisection over a log grid finds the last passing value with few probes."""

from __future__ import annotations

import math

import pytest

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
