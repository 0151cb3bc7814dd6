"""The Python API: ``deltafix repair`` callable from a script or a notebook.

    from deltafix import repair
    report = repair("A", "F", "R", utility_data="train.jsonl")            # the default method
    report = repair("A", "F", "R", method="safedelta", scale=0.1)         # a method's parameters
    report = repair("A", "F", "R", recipe="regmean", mu="auto")      # a shipped recipe, or a path

Runs the same pipeline as the command line (``deltafix.engine.pipeline.run_repair``) with the same
checks, defaults and atomic output, and returns the report written to ``OUT/deltafix_report.json``.
Errors are ``deltafix.errors.DeltafixError`` subclasses whose message is the line the command
line would print. For in-memory tensors, the methods themselves are pure functions in
``deltafix.methods`` (e.g. ``deltafix.methods.safedelta.safe_delta_sweep``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltafix.options import DEVICE, DTYPE, OUT_SHARD_SIZE, UTILITY_SAMPLES
from deltafix.methods import MethodParams

DEFAULT_METHOD = "regmean"
"""Keeps both refusals and the task on the real-model testbed (README, "On a real model")."""
FALLBACK_METHOD = "safedelta"
"""Without the user's data, which RegMean needs: the best of the methods that need no task data."""


def choose_method(method: str | None, recipe: str | Path | None, overrides: dict[str, Any],
                  utility_data: str | Path | None) -> tuple[str, MethodParams, str | None]:
    """Method name, validated parameters (recipe values, then ``overrides``) and a note for the user.

    With neither ``method`` nor a recipe: ``DEFAULT_METHOD`` when the user's data is given, else
    ``FALLBACK_METHOD``, and the note says why.
    """
    from deltafix.options import load_recipe, method_params
    from deltafix.errors import OptionError

    recipe_data = load_recipe(Path(recipe)) if recipe else None
    if recipe_data and method and method != recipe_data.method:
        raise OptionError(f"--method {method} contradicts the recipe's method {recipe_data.method}; drop one.")
    name = method or (recipe_data.method if recipe_data else None)
    note = None
    if name is None:
        name = DEFAULT_METHOD if utility_data is not None else FALLBACK_METHOD
        if utility_data is None:
            note = (f"method {FALLBACK_METHOD}, since the default, {DEFAULT_METHOD}, needs --utility-data "
                    "(a sample of F's fine-tuning data) and keeps far more of the task.")
    return name, method_params(name, recipe_data.parameters if recipe_data else {}, overrides), note


def repair(base: str | Path, finetuned: str | Path, out: str | Path, *, method: str | None = None,
           recipe: str | Path | None = None, unaligned: str | Path | None = None, unaligned_kind: str | None = None,
           safety_data: str | Path | None = None, utility_data: str | Path | None = None,
           utility_samples: int = UTILITY_SAMPLES, screen_utility: bool = True, device: str = DEVICE,
           dtype: str = DTYPE, out_shard_size: int | str = OUT_SHARD_SIZE, overwrite: bool = False,
           front: bool = False, progress: bool = False, **params: Any) -> dict[str, Any]:
    """Repair ``finetuned`` against ``base`` into ``out`` and return the report.

    Every keyword has the meaning of the ``deltafix repair`` option of that name; ``params`` are
    the method's parameters (as ``--set``), e.g. ``scale=0.1`` or ``mu="auto"``. A note the
    command line would print (the method chosen without ``utility_data``) goes into
    ``report["notes"]``.
    """
    from deltafix.io.writer import parse_size
    from deltafix.engine.pipeline import RepairOptions, run_repair

    name, method_params, note = choose_method(method, recipe, params, utility_data)
    shard_size = out_shard_size if isinstance(out_shard_size, int) else parse_size(out_shard_size)
    call = ", ".join([repr(str(base)), repr(str(finetuned)), repr(str(out)), f"method={name!r}",
                      *(f"{k}={v!r}" for k, v in params.items())])
    result = run_repair(RepairOptions(
        base=str(base), finetuned=str(finetuned), out=Path(out), method=name, params=method_params,
        unaligned=str(unaligned) if unaligned is not None else None, unaligned_kind=unaligned_kind,
        safety_data=Path(safety_data) if safety_data is not None else None,
        utility_data=Path(utility_data) if utility_data is not None else None,
        utility_samples=utility_samples, screen_utility=screen_utility, device=device, dtype=dtype,
        shard_size=shard_size, overwrite=overwrite, front=front, progress=progress,
        command=f"deltafix.repair({call})",
    ))
    report = dict(result.report)
    if note is not None:
        report["notes"] = [*report.get("notes", []), note]
    return report
