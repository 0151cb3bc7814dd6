"""Find the last value of an ordered grid that still passes a check, by bisection.

Used by every method's ``auto`` knob: the grid runs from the safest value to the one that keeps
most of the fine-tune, so "passes the target ASR" is assumed monotone (true at the start, false
at the end); each probe costs one in-memory repair and eval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class SearchResult:
    """The chosen value (None if even the smallest fails) and every probe as (value, passed, score)."""

    value: float | None
    probes: list[tuple[float, bool, float]] = field(default_factory=list)


def log_grid(low: float, high: float, per_decade: int) -> list[float]:
    """Geometric grid from ``low`` to ``high`` inclusive with ``per_decade`` points per factor of 10."""
    if not 0 < low < high:
        raise ValueError("need 0 < low < high")
    n = round(math.log10(high / low) * per_decade)
    return [low * 10 ** (i / per_decade) for i in range(n + 1)]


def largest_passing(grid: list[float], probe: Callable[[float], tuple[bool, float]]) -> SearchResult:
    """Bisection over the ordered ``grid`` for the last value whose ``probe`` passes.

    ``probe(value) -> (passed, score)``; ``score`` (e.g. the ASR) is only recorded. Takes about
    ``log2(len(grid)) + 2`` probes.
    """
    result = SearchResult(None)

    def check(i: int) -> bool:
        passed, score = probe(grid[i])
        result.probes.append((grid[i], passed, score))
        return passed

    lo, hi = 0, len(grid) - 1
    if not check(lo):
        return result
    if check(hi):
        result.value = grid[hi]
        return result
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if check(mid):
            lo = mid
        else:
            hi = mid
    result.value = grid[lo]
    return result
