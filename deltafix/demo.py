"""``deltafix demo``: the whole story offline, on the tiny testbed or the real model, in one table.

Builds (or loads from the cache) a testbed: the toy one (``deltafix.testbed.build``, minutes) or,
with ``real``, SmolLM2-135M-Instruct aligned and fine-tuned (``deltafix.testbed.realmodel``, about
25 minutes once). Repairs F with every registered method using its recipe, evaluates the testbed's
models and each repair on held-out harmful prompts, benign prompts and the user's task, and
returns one row per model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from deltafix.options import RECIPES, load_recipe, method_params
from deltafix.methods import get_method, method_names
from deltafix.engine.pipeline import RepairOptions, run_repair


@dataclass
class DemoRow:
    """One line of the demo table."""

    model: str
    asr: float
    benign_help: float | None
    accuracy: float | None
    seconds: float


def recipe_params(method: str) -> dict:
    """The shipped recipe's parameters for ``method`` (package data, so this works from a wheel;
    empty for a method that ships no recipe)."""
    path = RECIPES / f"{method}.yaml"
    return load_recipe(path).parameters if path.is_file() else {}


def run_demo(out: Path, *, real: bool = False, auto: bool = False, progress: bool = True,
             methods: list[str] | None = None, echo: Callable[[str], None] = lambda _: None) -> list[DemoRow]:
    """Build the testbed, repair F with each method into ``out/<method>``, evaluate everything.

    The toy table has rows A, F and one per method; the real one also P, F_benign and F_lora,
    since on a real model those are worth seeing (P's ASR, what a task-only fine-tune costs).
    ``auto`` adds a row per method with its main knob at ``auto`` (minutes each on the real model).
    """
    from deltafix.evaluation.evaluate import evaluate_folder
    from deltafix.testbed import build_real_testbed, build_testbed

    started = time.perf_counter()
    bed = build_real_testbed(progress=progress, echo=echo) if real else build_testbed(progress=progress)
    echo(f"testbed ready in {time.perf_counter() - started:.1f}s")

    def evaluate(name: str, folder: Path, seconds: float) -> DemoRow:
        result = evaluate_folder(folder, harmful=bed.harmful_eval, benign=bed.benign_eval, utility=bed.task_eval,
                                 device="cpu", progress=False)
        row = DemoRow(name, result.asr, result.benign_help, result.accuracy, seconds)
        echo(f"{name}: ASR {row.asr:.2f}, benign help {row.benign_help:.2f}, task {row.accuracy:.2f}")
        return row

    models = [("A (aligned)", bed.aligned), ("F (fine-tuned)", bed.finetuned)]
    if real:
        models = [("P (unaligned)", bed.unaligned), *models, ("F_benign (task only)", bed.finetuned_benign),
                  ("F_lora (adapter)", bed.finetuned_lora)]
    rows = [evaluate(name, folder, 0.0) for name, folder in models]
    runs = [(method, {}) for method in methods or method_names()]
    if auto:
        runs += [(method, {get_method(method).tune.param: "auto"}) for method, _ in runs]
    for method, overrides in runs:
        start = time.perf_counter()
        name = method + "".join(f" {k}=auto" for k in overrides)
        params = method_params(method, recipe_params(method), overrides)
        run_repair(RepairOptions(
            base=str(bed.aligned), finetuned=str(bed.finetuned), out=out / name.replace(" ", "_"), method=method,
            params=params, unaligned=str(bed.unaligned), safety_data=bed.safety_data, utility_data=bed.user_data,
            device="cpu", overwrite=True, progress=False, command=f"deltafix demo ({name})",
        ))
        rows.append(evaluate(f"F + {name}", out / name.replace(" ", "_"), time.perf_counter() - start))
    return rows


def rows_as_dicts(rows: list[DemoRow]) -> list[dict]:
    return [asdict(r) for r in rows]
