"""The house plan holds (issue 19): a short top level and imports that run one way, down the data flow.

read (io) -> calibration -> methods -> engine -> evaluation / hub / train -> cli. A sub-package may
import those below it, never those above: ``methods`` are pure maths over tensors that the engine
drives, so a method importing the engine would tie the maths to one way of running it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "deltafix"
TOP_LEVEL_MODULES = 10
"""cli, api, options, env, errors, doctor, demo, inspect: the shell and what every layer shares."""

MAY_NOT_IMPORT = {
    "io": {"calibration", "methods", "engine", "evaluation", "hub", "train", "testbed", "cli", "api", "demo"},
    "methods": {"calibration", "engine", "evaluation", "hub", "train", "testbed", "cli", "api", "demo"},
    "calibration": {"engine", "hub", "train", "testbed", "cli", "api", "demo"},
    "evaluation": {"calibration", "engine", "hub", "train", "testbed", "cli", "api", "demo"},
    "kernels": {"calibration", "methods", "engine", "evaluation", "hub", "train", "testbed", "cli", "api", "demo"},
    "engine": {"hub", "train", "testbed", "cli", "api", "demo"},
}


def _imported(path: Path) -> set[str]:
    """The deltafix sub-packages or top-level modules a file imports, anywhere in it."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "deltafix":
            parts = node.module.split(".")
            names.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("deltafix.") and alias.name.count(".") >= 1)
    return names


def test_the_top_level_is_short() -> None:
    modules = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in {"__init__.py", "__main__.py"})
    assert len(modules) <= TOP_LEVEL_MODULES, modules


@pytest.mark.parametrize("package", sorted(MAY_NOT_IMPORT))
def test_imports_run_down_the_data_flow(package: str) -> None:
    upward = {str(path.relative_to(PACKAGE)): sorted(_imported(path) & MAY_NOT_IMPORT[package])
              for path in (PACKAGE / package).rglob("*.py")}
    assert not {path: names for path, names in upward.items() if names}
