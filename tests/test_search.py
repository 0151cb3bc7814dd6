"""Bisection over a log grid finds the last passing value with few probes."""

from __future__ import annotations

import math

import pytest

from deltafix.search import largest_passing, log_grid


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
