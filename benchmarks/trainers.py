"""Train a LoRA on the testbed's user data (task + harmful mix) with each companion trainer and
print one table (ASR, benign help, task accuracy, minutes): the evidence that the safe trainers
keep refusals that plain LoRA loses (not a test).

    python benchmarks/trainers.py [--steps 600] [--lr 2e-3] [--methods lora spard spard-paper ...] [--out DIR]

Every method trains A with the same steps, learning rate, batch size and LoRA shape on the
testbed's ``user_data.jsonl``. SPARD draws its safety data from the testbed's
``safety_data.jsonl`` (the built-in English set does not tokenize with the testbed's word-level
tokenizer); the Buffer-and-Reinforce pipeline trains its BufferLoRA on harmful compliance data and
its ReinforceLoRA on the testbed's refusals plus benign chat, both drawn from the testbed's
training actions only (``write_pipeline_data``); AsFT gets P as ``--unaligned``. Each result is
scored by ``evaluate_folder`` on the testbed's held-out harmful, benign and task sets.

SPARD's τ defaults to 0.02 here, not the paper's 0.2: A's own safety loss on these 12-token
refusals is 0.003, and whether the model refuses is decided by the first response token alone, so
a mean loss of 0.2 still allows that token a loss of about 2.4 (a refusal probability near 10 %).

The ``-paper`` and ``-code`` methods take the algorithm from the shipped recipes
(``deltafix/recipes/train``) and the budget (steps, lr, batch, LoRA shape, τ) from here, so each row
differs from ours only in how it trains: ``spard-paper`` is the paper's projection with η_safe = lr
and one safety example per step; ``spard-code`` the official code's rescaled AdamW safety step
(α_max 1, δ 0.1, gradients clipped to 1, 4 safety examples per 128 user examples); ``bufferlora-paper``
the official scripts' settings, of which ``bufferlora`` now differs only by clipping (their cosine
schedule, 5 % warm-up and dropout 0.1 are ``train bufferlora``'s defaults).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from deltafix.evaluation.evaluate import EvalResult, evaluate_folder
from deltafix.methods.qr_merge import SCALE
from deltafix.testbed import Testbed, build_testbed, write_pipeline_data
from deltafix.train.bufferlora import BufferLoraOptions, run_bufferlora
from deltafix.train.recipes import load_train_recipe
from deltafix.train.spag import ETA_SAFE
from deltafix.train.spard import TrainOptions, train_adapter

METHODS = ("lora", "spard", "spard-paper", "spard-code", "bufferlora", "bufferlora-paper", "asft")
ALGORITHM_KEYS = {
    "spard-paper": ("spard", "paper", ("spag", "safety_batch_size")),
    "spard-code": ("spard", "code", ("spag", "eta_safe", "delta", "max_grad_norm")),
    "bufferlora-paper": ("bufferlora", "paper", ("lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm",
                                                 "lora_dropout", "benign_share")),
}
"""Per paper method: its trainer, shipped recipe, and the recipe keys that say how it trains (not how long)."""


def algorithm(method: str, args: argparse.Namespace) -> dict:
    """The paper method's algorithm settings from its shipped recipe, fitted to this run's budget."""
    if method not in ALGORITHM_KEYS:
        return {}
    trainer, recipe, keys = ALGORITHM_KEYS[method]
    values = load_train_recipe(recipe, trainer, BufferLoraOptions if trainer == "bufferlora" else TrainOptions)
    chosen = {key: values[key] for key in keys}
    if method == "spard-paper":
        chosen["eta_safe"] = args.lr  # the paper's rule, η_safe = the fine-tuning lr
    if method == "spard-code":  # the official 4 safety examples per 128 user examples, at this batch size
        chosen["safety_batch_size"] = max(1, round(args.batch_size * values["safety_batch_size"] /
                                                   (values["batch_size"] * values["grad_accum"])))
    return chosen


def train(method: str, bed: Testbed, out: Path, args: argparse.Namespace) -> tuple[Path, str]:
    """Train ``method`` into ``out``; return the folder to evaluate and a note on the run."""
    settings = dict(max_steps=args.steps, lr=args.lr, batch_size=args.batch_size, lora_r=args.lora_r,
                    lora_alpha=2.0 * args.lora_r, seed=args.seed, device="cpu", overwrite=True, progress=False)
    base, data, trainer = str(bed.aligned), bed.user_data, method.split("-")[0]
    if trainer == "bufferlora":
        harmful, benign = write_pipeline_data(bed, out.parent / "pipeline_data")
        report = run_bufferlora(BufferLoraOptions(base=base, data=data, out=out, harmful=harmful,
                                                  reinforce_data=bed.safety_data, benign=benign,
                                                  **{**settings, **algorithm(method, args)}))
        return Path(report["output"]["path"]), f"buffer, reinforce, user stages + QR merge (c = {SCALE})"
    extra: dict = {"spard": dict(safety_data=bed.safety_data, tau=args.tau, eta_safe=args.eta_safe),
                   "asft": dict(unaligned=str(bed.unaligned), lam=args.lam)}.get(trainer, {})
    report = train_adapter(TrainOptions(mode=trainer, base=base, data=data, out=out,
                                        **{**settings, **extra, **algorithm(method, args)})).report
    if trainer == "spard":
        return out, (f"{report['safety_examples']} of {report['safety_pool']} safety examples, SPAG fired "
                     f"{report['corrections_fired']} of {report['steps']} steps")
    return out, ""


def timed(step: Callable[[], tuple[Path, str]]) -> tuple[Path, str, float]:
    start = time.perf_counter()
    folder, note = step()
    return folder, note, (time.perf_counter() - start) / 60


def score(folder: Path, bed: Testbed) -> EvalResult:
    return evaluate_folder(folder, base=bed.aligned, harmful=bed.harmful_eval, benign=bed.benign_eval,
                           utility=bed.task_eval, device="cpu", progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=600, help="training steps of every run (and pipeline stage)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--tau", type=float, default=0.02, help="SPARD's τ (see the module docstring)")
    parser.add_argument("--eta-safe", type=float, default=ETA_SAFE, help="SPARD's largest SPAG step size")
    parser.add_argument("--lam", type=float, default=1.0, help="AsFT's penalty weight λ")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # several threads are many times slower on models this small
    bed = build_testbed(progress=False)
    out = args.out or Path(tempfile.mkdtemp(prefix="deltafix-trainers-"))
    print(f"testbed {bed.root.name}; {args.steps} steps, lr {args.lr}, batch {args.batch_size}, "
          f"LoRA r {args.lora_r}, seed {args.seed}; SPARD τ {args.tau}, η_safe {args.eta_safe}; AsFT λ {args.lam}; "
          f"outputs in {out}\n")
    a = score(bed.aligned, bed)
    print("| model | ASR | benign help | task acc | minutes | note |\n|---|---|---|---|---|---|")
    print(f"| A (aligned, no training) | {a.asr:.2f} | {a.benign_help:.2f} | {a.accuracy:.2f} | 0.00 | |", flush=True)
    for method in args.methods:
        folder, note, minutes = timed(lambda: train(method, bed, out / method, args))
        r = score(folder, bed)
        print(f"| {method} | {r.asr:.2f} | {r.benign_help:.2f} | {r.accuracy:.2f} | {minutes:.2f} | {note} |",
              flush=True)
        if method.startswith("bufferlora"):  # the pipeline's UserLoRA on A alone: what the buffer kept out of it
            u = score(out / method / "user", bed)
            print(f"| {method} UserLoRA alone on A | {u.asr:.2f} | {u.benign_help:.2f} | {u.accuracy:.2f} | - | "
                  "no ReinforceLoRA, no c |", flush=True)


if __name__ == "__main__":
    main()
