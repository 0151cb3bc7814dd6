"""Recipes: a method name plus its parameters, from YAML and ``--set KEY=VALUE`` overrides.

Each method declares its parameters once, as a pydantic model in its own module; that model is
the single source of truth for the YAML keys, the ``--set`` names, validation and the effective
recipe written into OUT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from deltafix.errors import OptionError
from deltafix.methods import MethodParams, get_method


class Recipe(BaseModel):
    """The YAML file: ``method: NAME`` and a ``parameters:`` mapping."""

    model_config = ConfigDict(extra="forbid")

    method: str
    parameters: dict[str, Any] = {}


def load_recipe(path: Path) -> Recipe:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise OptionError(f"cannot read recipe {path}: {err.strerror or err}.") from err
    except yaml.YAMLError as err:
        raise OptionError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}.") from err
    try:
        return Recipe.model_validate(data or {})
    except ValidationError as err:
        raise OptionError(f"recipe {path}: {_first_error(err, Recipe)}.") from err


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["scale=0.11", "select=threshold"]`` -> ``{"scale": 0.11, "select": "threshold"}`` (YAML scalars)."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--set {item!r} must look like KEY=VALUE, e.g. --set scale=0.11.")
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise OptionError(f"--set {item!r}: cannot read the value ({err}).") from err
    return values


def method_params(method: str, recipe: dict[str, Any], overrides: dict[str, Any]) -> MethodParams:
    """Validate recipe values, then ``--set`` overrides, against the method's parameter model."""
    model = get_method(method).params
    try:
        return model.model_validate({**recipe, **overrides})
    except ValidationError as err:
        raise OptionError(f"method {method}: {_first_error(err, model)}.") from err


def recipe_yaml(method: str, params: MethodParams) -> str:
    """The effective recipe (every parameter, defaults included), loadable with ``--recipe``."""
    return yaml.safe_dump(
        {"method": method, "parameters": params.model_dump(mode="json")}, sort_keys=False
    )


def _first_error(err: ValidationError, model: type[BaseModel]) -> str:
    """The first problem, in one phrase; an unknown key also lists the keys ``model`` takes."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "value"
    if first["type"] == "extra_forbidden":
        return f"unknown parameter {where!r} (it takes: {', '.join(model.model_fields)})"
    return f"{where}: {first['msg']}"
