"""User-facing options and their defaults, declared once: the command line, recipes, the Python API
and the report read them here.

Recipes: a method name plus its parameters, from YAML and ``--set KEY=VALUE`` overrides.

Each method declares its parameters once, as a pydantic model in its own module; that model is
the single source of truth for the YAML keys, the ``--set`` names, validation and the effective
recipe written into OUT.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from deltafix.errors import OptionError
from deltafix.methods import MethodParams, get_method

UTILITY_SAMPLES = 128
"""Conversations of the user's data used for calibration, as GPTQ and SparseGPT use 128 sequences:
the user's file is often the whole fine-tuning set, and a sequential RegMean solve costs time in
proportion to the tokens it reads (1800 conversations to 128 on the toy testbed, 445 to 128 on the
real one)."""


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
    except RecursionError as err:  # the YAML constructor recurses once per nesting level
        raise OptionError(f"recipe {path} is nested too deeply; a recipe is a method and a flat parameter map.") from err
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
            raise OptionError(f"--set {key.strip()}: cannot read the value ({str(err).splitlines()[0]}).") from err
        except RecursionError as err:
            raise OptionError(f"--set {key.strip()}: the value is nested too deeply; give a number or a word.") from err
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
    """The first problem, in one phrase; an unknown key also lists the keys ``model`` takes, and a
    value of the wrong type or range says what the key takes (``scale takes a finite number >= 0``)."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "value"
    if first["type"] == "extra_forbidden":
        return f"unknown parameter {where!r} (it takes: {', '.join(model.model_fields)})"
    key = first["loc"][0] if first["loc"] else None
    field = model.model_fields.get(key) if isinstance(key, str) else None
    if field is None or first["type"] in ("value_error", "assertion_error"):
        return f"{where}: {first['msg'].removeprefix('Value error, ')}"
    accepted = _accepted(field.annotation, field.metadata)
    return f"{key} takes {' or '.join(accepted)}, not {_shown(first['input'])}"


def _shown(value: Any) -> str:
    """A rejected input as the user typed it: ``nan``, ``-1``, ``'high'``."""
    return str(value) if isinstance(value, (int, float)) else repr(value)


BOUNDS = {annotated_types.Gt: ">", annotated_types.Ge: ">=", annotated_types.Lt: "<", annotated_types.Le: "<="}


def _accepted(annotation: Any, metadata: list[Any]) -> list[str]:
    """What a parameter type takes, in words, one entry per member of a union: a number's bounds
    come from its ``Field`` constraints, finiteness from ``allow_inf_nan``."""
    if get_origin(annotation) is Annotated:
        base, *extra = get_args(annotation)
        inner = [m for item in extra for m in (item.metadata if isinstance(item, FieldInfo) else [item])]
        return _accepted(base, [*metadata, *inner])
    if get_origin(annotation) in (Union, UnionType):
        return [words for member in get_args(annotation) for words in _accepted(member, metadata)]
    if get_origin(annotation) is Literal:
        return [repr(value) for value in get_args(annotation)]
    if annotation is bool:
        return ["true or false"]
    if annotation in (int, float):
        finite = not any(getattr(m, "allow_inf_nan", False) for m in metadata)
        kind = ("a finite number" if finite else "a number") if annotation is float else "an integer"
        bounds = [f"{symbol} {getattr(m, type(m).__name__.lower())}" for m in metadata
                  for cls, symbol in BOUNDS.items() if isinstance(m, cls)]
        return [" ".join([kind, " and ".join(bounds)]).strip() + ("" if finite else " (inf allowed)")]
    if annotation is str:
        return ["text"]
    if annotation is type(None):
        return ["null"]
    return [getattr(annotation, "__name__", str(annotation))]
