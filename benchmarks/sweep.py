"""Sweep each method's main parameter on the testbed and print (value, ASR, benign help, task
accuracy, seconds) tables: the evidence behind the recipe defaults (not a test).

    python benchmarks/sweep.py [--methods safedelta regmean ...] [--set KEY=VALUE ...] [--utility-data FILE]
                               [--compensation exact reference] [--safety-template reference]
                               [--grid KEY=V1,V2,...] [--real] [--out DIR]

``--set`` fixes a parameter for every row (e.g. ``--set sequential=false`` for RegMean on
independent Hessians); ``--utility-data`` replaces the testbed's user data (e.g. the task-only mix
``user_data_benign.jsonl``) for methods that read it. ``--compensation`` runs each Safe Delta row
once per compensation given, side by side: ours (exact) against the released code's (reference).
``--grid`` replaces each method's rows with one per value of KEY; ``--real`` sweeps the real-model
testbed (``deltafix.testbed.realmodel``: minutes per row on a CPU) instead of the toy one, and
scores on its held-out prompts.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import get_args

import yaml

from deltafix.calibration.templates import DEFAULT_SAFETY_TEMPLATE, SAFETY_TEMPLATES
from deltafix.methods.safedelta import Compensation
from deltafix.options import method_params, parse_sets
from deltafix.demo import recipe_params
from deltafix.evaluation.evaluate import evaluate_folder
from deltafix.engine.pipeline import RepairOptions, run_repair
from deltafix.testbed import build_real_testbed, build_testbed

SWEEPS: dict[str, list[dict]] = {
    "safedelta": [{"scale": s} for s in (0.1, 1, 3, 10, 30, 100, 300, 1000, 3000)],
    "regmean": [{"mu": m} for m in (0.01, 0.1, 0.3, 1, 1.5, 2, 2.5, 3, 4, 5, 10, 100)],
    "asft": [{"lam": lam, "projector": p} for p in ("exact", "reference") for lam in (1, 3, 10, 100, math.inf)],
    "safelora": [{"select": "number", "k": k} for k in (2, 5, 10, 14)]
    + [{"select": "threshold", "threshold": t} for t in (0.2, 0.35, 0.5)],
    "resta": [{"scale": s} for s in (0.2, 0.5, 0.75, 1.0)] + [{"scale": 0.5, "dare": 0.3}],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(SWEEPS))
    parser.add_argument("--finetuned", default="finetuned", help="testbed model to repair (finetuned or finetuned_lora)")
    parser.add_argument("--set", dest="fixed", action="append", default=[], metavar="KEY=VALUE",
                        help="parameter fixed for every row of every method given")
    parser.add_argument("--utility-data", type=Path, default=None, help="instead of the testbed's user data")
    parser.add_argument("--compensation", nargs="+", choices=get_args(Compensation), default=None,
                        help="Safe Delta: run each row once per compensation given (default: the recipe's)")
    parser.add_argument("--safety-template", choices=SAFETY_TEMPLATES, default=DEFAULT_SAFETY_TEMPLATE,
                        help="system prompts the safety data is calibrated under")
    parser.add_argument("--grid", default=None, metavar="KEY=V1,V2,...", help="the rows: one per value of KEY")
    parser.add_argument("--real", action="store_true", help="the real-model testbed instead of the toy one")
    parser.add_argument("--out", type=Path, default=None)
    opts = parser.parse_args()
    bed = build_real_testbed(progress=False) if opts.real else build_testbed(progress=False)
    out = opts.out or Path(tempfile.mkdtemp(prefix="deltafix-sweep-"))
    overrides = parse_sets(opts.fixed)
    bed_name = "real" if opts.real else "toy"
    for method in opts.methods:
        fixed = "".join(f", {s}" for s in opts.fixed)
        print(f"\n## {method} on the {bed_name} testbed's {opts.finetuned}{fixed}, "
              f"safety template {opts.safety_template}\n")
        print("| setting | ASR | benign help | task acc | seconds |\n|---|---|---|---|---|")
        settings = SWEEPS[method]
        if opts.grid:
            key, _, values = opts.grid.partition("=")
            settings = [{key: yaml.safe_load(value)} for value in values.split(",")]
        if method == "safedelta" and opts.compensation:
            settings = [{**setting, "compensation": c} for setting in settings for c in opts.compensation]
        for setting in settings:
            params = method_params(method, {**recipe_params(method), **setting}, overrides)
            start = time.perf_counter()
            run_repair(RepairOptions(
                base=str(bed.aligned), finetuned=str(getattr(bed, opts.finetuned)), out=out / method,
                method=method, params=params, unaligned=str(bed.unaligned), safety_data=bed.safety_data,
                safety_template=opts.safety_template,
                utility_data=opts.utility_data or bed.user_data, device="cpu", overwrite=True, progress=False,
            ))
            seconds = time.perf_counter() - start
            r = evaluate_folder(out / method, base=bed.aligned, harmful=bed.harmful_eval, benign=bed.benign_eval,
                                utility=bed.task_eval, progress=False)
            label = ", ".join(f"{k}={v}" for k, v in setting.items())
            print(f"| {label} | {r.asr:.3f} | {r.benign_help:.3f} | {r.accuracy:.3f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
