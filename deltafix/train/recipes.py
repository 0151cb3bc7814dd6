"""Training recipes: a trainer's options from YAML, and the shipped ones that run each paper's settings.

A recipe is ``trainer: NAME`` plus a flat ``parameters:`` map whose keys are the trainer's options
(``TrainOptions`` or ``BufferLoraOptions`` field names, as in the training report). The shipped
recipes live in ``deltafix/recipes/train/<trainer>-<name>.yaml`` (package data), so ``deltafix train
spard --recipe paper`` works from a wheel; each key there names its source. Inputs and outputs
(base, data, out) never come from a recipe. Our faster defaults stay the code's defaults: a recipe
only replaces the keys it names, and flags given on the command line replace the recipe's values.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from deltafix.errors import OptionError
from deltafix.options import read_recipe_yaml

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

TRAIN_RECIPES: Traversable = resources.files("deltafix") / "recipes" / "train"
"""The shipped training recipes, ``<trainer>-<name>.yaml``."""
RUN_KEYS = frozenset({"base", "data", "out", "overwrite", "progress", "command", "mode", "extra_data", "base_adapter",
                      "safety_data", "unaligned", "harmful", "buffer", "reinforce", "reinforce_data", "benign"})
"""Options a recipe may not set: the models and data to train on and where to write are the command line's."""

Trainer = Literal["lora", "spard", "asft", "bufferlora"]


class TrainRecipe(BaseModel):
    """The YAML file: which trainer it is for and the options it sets."""

    model_config = ConfigDict(extra="forbid")

    trainer: Trainer
    parameters: dict[str, Any] = {}


def shipped_recipes(trainer: str) -> list[str]:
    """Names of the shipped recipes of ``trainer`` (``paper`` for ``train spard``)."""
    prefix = f"{trainer}-"
    return sorted(item.name.removeprefix(prefix).removesuffix(".yaml") for item in TRAIN_RECIPES.iterdir()
                  if item.name.startswith(prefix) and item.name.endswith(".yaml"))


def load_train_recipe(ref: str | Path, trainer: str, options: type[BaseModel]) -> dict[str, Any]:
    """The options set by recipe ``ref`` (a YAML file, or the name of a shipped recipe of ``trainer``),
    checked against ``options``' fields; a recipe for another trainer is an ``OptionError``."""
    shipped = TRAIN_RECIPES / f"{trainer}-{ref}.yaml"
    source: Path | Traversable = shipped if not Path(ref).exists() and shipped.is_file() else Path(ref)
    names = ", ".join(shipped_recipes(trainer)) or "none"
    document = read_recipe_yaml(source, ref, f"a YAML file, or a shipped recipe of train {trainer}: {names}")
    try:
        recipe = TrainRecipe.model_validate(document or {})
    except ValidationError as err:
        first = err.errors()[0]
        raise OptionError(f"recipe {ref}: {'.'.join(map(str, first['loc'])) or 'value'}: {first['msg']}.") from err
    if recipe.trainer != trainer:
        raise OptionError(f"recipe {ref} is for train {recipe.trainer}, not train {trainer}.")
    allowed = sorted(set(options.model_fields) - RUN_KEYS)
    unknown = sorted(set(recipe.parameters) - set(allowed))
    if unknown:
        raise OptionError(f"recipe {ref}: unknown parameter {unknown[0]!r} for train {trainer} "
                          f"(it takes: {', '.join(allowed)}).")
    return recipe.parameters
