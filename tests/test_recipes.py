"""Every shipped recipe loads and validates against its method, with every parameter spelled out,
and ships as package data: ``--recipe NAME`` and the demo read it where the package is installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltafix.errors import OptionError
from deltafix.methods import get_method, method_names
from deltafix.options import RECIPES, load_recipe, method_params

SHIPPED = sorted((Path(__file__).parent.parent / "deltafix" / "recipes").glob("*.yaml"))


def test_every_method_ships_a_recipe_and_nothing_else() -> None:
    assert [p.stem for p in SHIPPED] == sorted(method_names())
    assert sorted(entry.name for entry in RECIPES.iterdir() if entry.name.endswith(".yaml")) == \
        [p.name for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_recipe_is_complete_and_valid(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.method == path.stem
    method_params(recipe.method, recipe.parameters, {})
    assert set(recipe.parameters) == set(get_method(recipe.method).params.model_fields)


def test_set_overrides_recipe() -> None:
    recipe = load_recipe("resta")
    assert method_params("resta", recipe.parameters, {"scale": 0.9}).scale == 0.9


def test_a_method_name_reads_the_shipped_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--recipe regmean`` from any folder; a file of that name in the folder wins (a path is a path)."""
    monkeypatch.chdir(tmp_path)
    assert load_recipe("regmean") == load_recipe(RECIPES / "regmean.yaml")
    (tmp_path / "regmean").write_text("method: regmean\nparameters: {mu: 1.0}\n")
    assert load_recipe(Path("regmean")).parameters == {"mu": 1.0}


def test_an_unknown_recipe_names_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="a path, or a shipped recipe: asft, regmean"):
        load_recipe(tmp_path / "missing.yaml")
