"""Issue 18: ``--dry-run``'s memory estimate is within 30 % of the peak RSS of the run it plans.

Every method runs on the toy testbed with its shipped recipe, as in ``test_repair_testbed``: a dry
run and a real one (``--no-cache``: calibration is counted cold), each in a fresh process. On a
model this small the estimate is mostly its measured baseline (Python, torch, the calibration
stack: 250 to 370 MB); the modelled parts are a few MB, so this checks the sum, not each part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

METHODS = ("safedelta", "regmean", "resta")
"""One method per kind of run: calibrated, sequential with a screen, streamed only."""
STREAMED_LIKE_RESTA = ("asft", "safelora")
"""Their run has resta's phases and sizes; measured with ``pytest -m heavy`` to keep the default suite short."""
TOLERANCE = 0.30
"""The issue's bar: |estimate − measured| ≤ 30 % of the measured peak."""
DETACHED = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
"""A small parent for the measured run: Linux keeps ru_maxrss across exec, so a child spawned straight
from pytest (400+ MB) would report pytest's RSS as its own peak; its grandchild starts from this one's."""


def _deltafix(bed: Any, out: Path, method: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deltafix", "repair", "--base", str(bed.aligned), "--finetuned", str(bed.finetuned),
            "--out", str(out), "--recipe", method, "--unaligned", str(bed.unaligned),
            "--safety-data", str(bed.safety_data), "--utility-data", str(bed.user_data), "--device", "cpu",
            "--json", *extra]


def _run(args: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _estimate_and_peak(bed: Any, root: Path, method: str) -> tuple[dict[str, Any], int]:
    plan = json.loads(_run(_deltafix(bed, root / f"{method}-dry", method, "--dry-run")))
    _run([sys.executable, "-c", DETACHED, *_deltafix(bed, root / method, method, "--no-cache")])
    report = json.loads((root / method / "deltafix_report.json").read_text())
    return plan, report["peak_rss_bytes"]


def _measure(bed: Any, root: Path, methods: tuple[str, ...]) -> dict[str, tuple[dict[str, Any], int]]:
    """Per method, the dry run's JSON and the real run's peak RSS; two processes at a time (the
    runs are single-threaded; RSS is per process)."""
    with ThreadPoolExecutor(2) as pool:
        futures = {method: pool.submit(_estimate_and_peak, bed, root, method) for method in methods}
        return {method: future.result() for method, future in futures.items()}


@pytest.fixture(scope="module")
def measured(bed: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], int]]:
    return _measure(bed, tmp_path_factory.mktemp("memory"), METHODS)


@pytest.mark.parametrize("method", [*METHODS, *(pytest.param(m, marks=pytest.mark.heavy)
                                                for m in STREAMED_LIKE_RESTA)])
def test_estimate_is_within_30_percent_of_the_measured_peak(measured: dict[str, tuple[dict[str, Any], int]],
                                                            bed: Any, tmp_path: Path, method: str) -> None:
    plan, peak = measured[method] if method in measured else _measure(bed, tmp_path, (method,))[method]
    memory = plan["memory"]
    assert plan["estimated_peak_bytes"] == memory["peak_bytes"]
    parts = ", ".join(f"{p['phase']}/{p['name']} {p['bytes'] / 1e6:.1f} MB" for p in memory["parts"])
    assert abs(memory["peak_bytes"] - peak) <= TOLERANCE * peak, \
        f"{method}: estimated {memory['peak_bytes'] / 1e6:.1f} MB ({parts}), measured {peak / 1e6:.1f} MB"


def test_the_parts_follow_the_method(measured: dict[str, tuple[dict[str, Any], int]]) -> None:
    """The phases each method goes through: Hessian methods import the calibration stack and
    calibrate, RegMean (sequential, screening its data) solves in order; the others only stream."""
    phases = {method: set(plan["memory"]["phases"]) for method, (plan, _) in measured.items()}
    assert phases["safedelta"] == {"calibrate safety", "repair stream"}
    assert phases["regmean"] == {"screen", "sequential solve", "repair stream"}
    assert phases["resta"] == {"repair stream"}
    assert [p["name"] for p in measured["resta"][0]["memory"]["parts"] if p["phase"] == "baseline"] == ["process"]
    for method in ("safedelta", "regmean"):
        baseline = {p["name"]: p["bytes"] for p in measured[method][0]["memory"]["parts"] if p["phase"] == "baseline"}
        assert baseline["calibration imports"] > 0  # a fresh process has not imported transformers yet
