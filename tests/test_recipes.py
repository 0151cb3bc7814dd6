"""Every shipped recipe loads and validates against its method, with every parameter spelled out."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltafix.options import load_recipe, method_params
from deltafix.methods import get_method

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_is_complete_and_valid(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.method == path.stem
    method_params(recipe.method, recipe.parameters, {})
    assert set(recipe.parameters) == set(get_method(recipe.method).params.model_fields)


def test_set_overrides_recipe(tmp_path: Path) -> None:
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "resta.yaml")
    assert method_params("resta", recipe.parameters, {"scale": 0.9}).scale == 0.9
