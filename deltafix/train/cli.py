"""``deltafix train``: the companion trainer's commands (mounted by ``deltafix.cli``).

Thin like the main CLI: parse, build ``TrainOptions``, call the library, print. Errors are
``DeltafixError``s, which the main entry point turns into one line and exit code 2.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError

from deltafix.errors import OptionError
from deltafix.options import (ASFT_TRAIN_LAM, BENIGN_SHARE, BUFFERLORA_LORA_DROPOUT, BUFFERLORA_LR_SCHEDULER,
                              BUFFERLORA_WARMUP_RATIO, DEVICE, DPP_BATCH_SIZE, DPP_BETA, DPP_P, DTYPE, EPOCHS,
                              ETA_SAFE, GRAD_ACCUM, LEARNING_RATE, LORA_ALPHA, LORA_DROPOUT, LORA_R, LORA_TARGETS,
                              LR_SCHEDULER, MAX_GRAD_NORM, MERGE_ALPHA, MERGE_SCALE, OUT_SHARD_SIZE, SPAG_DELTA, SPAG_TAU,
                              SPAG_VARIANT, TRAIN_BATCH_SIZE, TRAIN_MAX_LENGTH, TRAIN_SEED, WARMUP_RATIO, WARMUP_STEPS,
                              WEIGHT_DECAY)

train_app = typer.Typer(
    help="Fine-tune a LoRA adapter on the aligned base that keeps its safety: SPARD (DPP-selected safety "
    "data + SPAG correction), the AsFT penalty, Buffer-and-Reinforce, or plain LoRA for comparison; `select` "
    "runs the DPP alone.",
)

Base = Annotated[str, typer.Option("--base", help="Aligned base model A to tune: local folder or Hub id.")]
Data = Annotated[Path, typer.Option("--data", help="User training data, JSONL of prompt/response or messages.")]
Out = Annotated[Path, typer.Option("--out", help="Output folder for the PEFT adapter and the training report.")]
Epochs = Annotated[int, typer.Option("--epochs", min=1, help="Passes over the user data.")]
MaxSteps = Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after this many steps.")]
Lr = Annotated[float, typer.Option("--lr", min=0.0, help="AdamW learning rate.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Examples per batch (per process).")]
LoraR = Annotated[int, typer.Option("--lora-r", min=1, help="LoRA rank r.")]
LoraAlpha = Annotated[float, typer.Option("--lora-alpha", min=0.0, help="LoRA alpha (scaling alpha/r).")]
Targets = Annotated[str, typer.Option("--target-modules", help="Comma-separated Linear names to adapt.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of LoRA init and data order.")]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA if available), cpu or cuda.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Base weights dtype: auto, float32, float16, bfloat16.")]
MaxLength = Annotated[int, typer.Option("--max-length", min=2, help="Longest tokenized example.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUT.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the JSON report instead of the summary.")]
SafetyData = Annotated[Optional[Path], typer.Option("--safety-data",
                                                    help="Safety JSONL (default: built-in calibration set).")]
P = Annotated[float, typer.Option("--p", min=0.0, max=1.0, help="DPP subset size: ceil(p * |user data|).")]
Beta = Annotated[float, typer.Option("--beta", min=0.0, help="DPP relevance exponent β.")]
GradAccum = Annotated[int, typer.Option("--grad-accum", min=1, help="Batches per optimizer step.")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.")]
Scheduler = Annotated[str, typer.Option("--lr-scheduler", help="Learning-rate schedule after the warm-up: constant, "
                                                               "linear or cosine (decay to 0).")]
WarmupRatio = Annotated[float, typer.Option("--warmup-ratio", min=0.0, max=1.0, help="Share of the steps warming "
                                                                                      "the learning rate up from 0.")]
WarmupSteps = Annotated[int, typer.Option("--warmup-steps", min=0, help="Warm-up steps; above 0 it wins over "
                                                                        "--warmup-ratio.")]
MaxGradNorm = Annotated[float, typer.Option("--max-grad-norm", min=0.0, help="Clip the gradient norm before each "
                                                                             "optimizer step; 0: no clipping.")]
LoraDropout = Annotated[float, typer.Option("--lora-dropout", min=0.0, max=1.0, help="Dropout on the LoRA path.")]
Recipe = Annotated[Optional[str], typer.Option(
    "--recipe", help="YAML training recipe (trainer and options): a file, or the name of a shipped recipe with a "
    "paper's settings (spard: paper, code; asft: paper; bufferlora: paper). Flags given on the command line "
    "replace its values.")]

DEFAULT_TARGETS = ",".join(LORA_TARGETS)
CLI_NAMES = {"shard_size": "out_shard_size"}
"""Options whose command-line parameter has another name."""


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user set option ``name`` on the command line (or its environment), not left it at the default."""
    source = ctx.get_parameter_source(CLI_NAMES.get(name, name))
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _options(ctx: typer.Context, model: type[Any], trainer: str, recipe: str | None, fields: dict[str, Any]) -> Any:
    """``model`` from the defaults, then the recipe's values, then the flags given on the command line."""
    from deltafix.train.recipes import load_train_recipe

    fields["target_modules"] = [t.strip() for t in fields["target_modules"].split(",") if t.strip()]
    values = dict(fields)
    if recipe is not None:
        values.update(load_train_recipe(recipe, trainer, model))
        values.update({name: value for name, value in fields.items() if _given(ctx, name)})
    try:
        return model(**values)
    except ValidationError as err:
        first = err.errors()[0]
        raise OptionError(f"invalid {'.'.join(map(str, first['loc']))}: {first['msg']}.") from None


def _fields(params: dict[str, Any]) -> dict[str, Any]:
    """A command's parameters (its ``locals()`` on entry) that are option fields of the same name."""
    return {name: value for name, value in params.items() if name not in ("ctx", "as_json", "recipe")}


def _train(ctx: typer.Context, as_json: bool, recipe: str | None, **fields: Any) -> None:
    from deltafix.train.spard import TrainOptions, train_adapter

    opts = _options(ctx, TrainOptions, fields["mode"], recipe, {"progress": not as_json, **fields})
    result = train_adapter(opts)
    report = result.report
    if not result.main_process:
        return
    if as_json:
        typer.echo(json.dumps({"out": str(opts.out), **report}, indent=2))
        return
    line = (f"trained {opts.mode} adapter for {report['steps']} steps in {report['seconds']:.1f}s; "
            f"final loss {report['losses'][-1]:.4f}")
    if opts.mode == "spard":
        capped = sum(size >= opts.eta_safe for size in report["correction_sizes"])
        line += (f"; {report['safety_examples']} of {report['safety_pool']} safety examples; "
                 f"SPAG fired {report['corrections_fired']} times ({capped} capped at --eta-safe)")
    typer.echo(f"{line}; wrote {opts.out}")


@train_app.command()
def select(
    base: Base,
    data: Data,
    pool: Annotated[Path, typer.Option("--pool", help="Candidate safety data, JSONL.")],
    out: Annotated[Path, typer.Option("--out", help="Output JSONL: the chosen pool records, greedy order.")],
    p: P = DPP_P,
    beta: Beta = DPP_BETA,
    batch_size: BatchSize = DPP_BATCH_SIZE,
    device: Device = DEVICE,
    dtype: Dtype = DTYPE,
    as_json: AsJson = False,
) -> None:
    """Pick a relevant, diverse subset of safety data for the user's data (DPP greedy MAP)."""
    from deltafix.env import resolve_device
    from deltafix.train.data import load_records, write_records
    from deltafix.train.dpp import select_subset
    from deltafix.train.spard import load_base

    model, tokenizer = load_base(base, dtype)
    model.to(resolve_device(device))
    user, candidates = load_records(data), load_records(pool)
    picked = select_subset(model, tokenizer, [r.prompt_text for r in candidates], [r.prompt_text for r in user],
                           p, beta, batch_size=batch_size, progress=not as_json)
    write_records([candidates[i] for i in picked], out)
    summary = {"out": str(out), "selected": picked, "pool": len(candidates), "user_examples": len(user)}
    typer.echo(json.dumps(summary, indent=2) if as_json else
               f"selected {len(picked)} of {len(candidates)} safety examples; wrote {out}")


@train_app.command()
def spard(
    ctx: typer.Context,
    base: Base, data: Data, out: Out,
    safety_data: SafetyData = None,
    safety_batch_size: Annotated[Optional[int], typer.Option(
        "--safety-batch-size", min=1, show_default="--batch-size", help="Safety examples per safety step.")] = None,
    select: Annotated[bool, typer.Option("--select/--no-select",
                                         help="Pick the safety subset with the DPP, or use all of it.")] = True,
    p: P = DPP_P,
    beta: Beta = DPP_BETA,
    tau: Annotated[float, typer.Option("--tau", min=0.0, help="SPAG fires when the safety loss exceeds τ; set it a "
                                                            "little above the base's own loss on the safety data.")] = SPAG_TAU,
    eta_safe: Annotated[float, typer.Option("--eta-safe", min=0.0, help="Largest SPAG step size: bounds the jump "
                                                                        "when the safety gradient is tiny.")] = ETA_SAFE,
    spag: Annotated[str, typer.Option("--spag", help="paper: projection step; code: optimizer step on the "
                                                     "safety batch when loss > τ + δ.")] = SPAG_VARIANT,
    delta: Annotated[float, typer.Option("--delta", min=0.0, help="Margin δ of --spag code.")] = SPAG_DELTA,
    epochs: Epochs = EPOCHS, max_steps: MaxSteps = None, lr: Lr = LEARNING_RATE, batch_size: BatchSize = TRAIN_BATCH_SIZE,
    lora_r: LoraR = LORA_R, lora_alpha: LoraAlpha = LORA_ALPHA, target_modules: Targets = DEFAULT_TARGETS,
    seed: Seed = TRAIN_SEED, device: Device = DEVICE, dtype: Dtype = DTYPE, max_length: MaxLength = TRAIN_MAX_LENGTH,
    grad_accum: GradAccum = GRAD_ACCUM, weight_decay: WeightDecay = WEIGHT_DECAY, lr_scheduler: Scheduler = LR_SCHEDULER,
    warmup_ratio: WarmupRatio = WARMUP_RATIO, warmup_steps: WarmupSteps = WARMUP_STEPS,
    max_grad_norm: MaxGradNorm = MAX_GRAD_NORM, lora_dropout: LoraDropout = LORA_DROPOUT, recipe: Recipe = None,
    overwrite: Overwrite = False, as_json: AsJson = False,
) -> None:
    """SPARD: LoRA on the user data with SPAG safety corrections on DPP-selected safety data."""
    _train(ctx, as_json, recipe, mode="spard", **_fields(locals()))


@train_app.command()
def asft(
    ctx: typer.Context,
    base: Base, data: Data, out: Out,
    unaligned: Annotated[str, typer.Option("--unaligned", help="Pre-alignment base P of --base.")],
    lam: Annotated[float, typer.Option("--lam", min=0.0, help="Weight λ of the AsFT penalty.")] = ASFT_TRAIN_LAM,
    epochs: Epochs = EPOCHS, max_steps: MaxSteps = None, lr: Lr = LEARNING_RATE, batch_size: BatchSize = TRAIN_BATCH_SIZE,
    lora_r: LoraR = LORA_R, lora_alpha: LoraAlpha = LORA_ALPHA, target_modules: Targets = DEFAULT_TARGETS,
    seed: Seed = TRAIN_SEED, device: Device = DEVICE, dtype: Dtype = DTYPE, max_length: MaxLength = TRAIN_MAX_LENGTH,
    grad_accum: GradAccum = GRAD_ACCUM, weight_decay: WeightDecay = WEIGHT_DECAY, lr_scheduler: Scheduler = LR_SCHEDULER,
    warmup_ratio: WarmupRatio = WARMUP_RATIO, warmup_steps: WarmupSteps = WARMUP_STEPS,
    max_grad_norm: MaxGradNorm = MAX_GRAD_NORM, lora_dropout: LoraDropout = LORA_DROPOUT, recipe: Recipe = None,
    overwrite: Overwrite = False, as_json: AsJson = False,
) -> None:
    """LoRA with the AsFT penalty λ Σ ‖(I − C) B A‖²: updates outside the alignment direction cost."""
    _train(ctx, as_json, recipe, mode="asft", **_fields(locals()))


@train_app.command()
def lora(
    ctx: typer.Context,
    base: Base, data: Data, out: Out,
    epochs: Epochs = EPOCHS, max_steps: MaxSteps = None, lr: Lr = LEARNING_RATE, batch_size: BatchSize = TRAIN_BATCH_SIZE,
    lora_r: LoraR = LORA_R, lora_alpha: LoraAlpha = LORA_ALPHA, target_modules: Targets = DEFAULT_TARGETS,
    seed: Seed = TRAIN_SEED, device: Device = DEVICE, dtype: Dtype = DTYPE, max_length: MaxLength = TRAIN_MAX_LENGTH,
    grad_accum: GradAccum = GRAD_ACCUM, weight_decay: WeightDecay = WEIGHT_DECAY, lr_scheduler: Scheduler = LR_SCHEDULER,
    warmup_ratio: WarmupRatio = WARMUP_RATIO, warmup_steps: WarmupSteps = WARMUP_STEPS,
    max_grad_norm: MaxGradNorm = MAX_GRAD_NORM, lora_dropout: LoraDropout = LORA_DROPOUT, recipe: Recipe = None,
    overwrite: Overwrite = False, as_json: AsJson = False,
) -> None:
    """Plain LoRA on the user data (no safety term): the baseline to compare against."""
    _train(ctx, as_json, recipe, mode="lora", **_fields(locals()))


@train_app.command()
def bufferlora(
    ctx: typer.Context,
    base: Base, data: Data,
    out: Annotated[Path, typer.Option("--out", help="Output folder: one subfolder per stage (buffer, reinforce, "
                                                    "user, merged) and the pipeline report.")],
    harmful: Annotated[Optional[Path], typer.Option("--harmful", help="Harmful compliance JSONL for the "
                                                                      "BufferLoRA (not needed with --buffer).")] = None,
    buffer: Annotated[Optional[Path], typer.Option("--buffer", help="Reuse a BufferLoRA trained on this base.")] = None,
    reinforce: Annotated[Optional[Path], typer.Option("--reinforce", help="Reuse a ReinforceLoRA trained on base + "
                                                                          "--buffer.")] = None,
    reinforce_data: Annotated[Optional[Path], typer.Option("--reinforce-data", help="Refusals JSONL for the "
                                                           "ReinforceLoRA (default: built-in safety set).")] = None,
    benign: Annotated[Optional[Path], typer.Option("--benign", help="Benign JSONL trained on with the refusals "
                                                                    "(default: built-in benign training set).")] = None,
    benign_share: Annotated[float, typer.Option("--benign-share", min=0.0, max=1.0, help="Share of benign records in "
                                                "the ReinforceLoRA's training set.")] = BENIGN_SHARE,
    as_adapter: Annotated[bool, typer.Option("--as-adapter", help="Write the merged result as the exact adapter "
                                                                  "instead of a full checkpoint.")] = False,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Share of ΔR's component in the "
                                                                           "user's column space removed.")] = MERGE_ALPHA,
    scale: Annotated[float, typer.Option("--scale", min=0.0, help="c in W = W_A + c(ΔU + ΔR⊥).")] = MERGE_SCALE,
    out_shard_size: Annotated[str, typer.Option("--out-shard-size", help="Largest output shard, e.g. 5GB.")] = OUT_SHARD_SIZE,
    epochs: Epochs = EPOCHS, max_steps: MaxSteps = None, lr: Lr = LEARNING_RATE, batch_size: BatchSize = TRAIN_BATCH_SIZE,
    lora_r: LoraR = LORA_R, lora_alpha: LoraAlpha = LORA_ALPHA, target_modules: Targets = DEFAULT_TARGETS,
    seed: Seed = TRAIN_SEED, device: Device = DEVICE, dtype: Dtype = DTYPE, max_length: MaxLength = TRAIN_MAX_LENGTH,
    grad_accum: GradAccum = GRAD_ACCUM, weight_decay: WeightDecay = WEIGHT_DECAY,
    lr_scheduler: Scheduler = BUFFERLORA_LR_SCHEDULER, warmup_ratio: WarmupRatio = BUFFERLORA_WARMUP_RATIO,
    warmup_steps: WarmupSteps = WARMUP_STEPS, max_grad_norm: MaxGradNorm = MAX_GRAD_NORM,
    lora_dropout: LoraDropout = BUFFERLORA_LORA_DROPOUT, recipe: Recipe = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo stages whose folder was made from other "
                                                                "options or data (matching ones are reused).")] = False,
    as_json: AsJson = False,
) -> None:
    """Buffer-and-Reinforce: UserLoRA trained with a harmful BufferLoRA merged in, then QR-merged with a
    ReinforceLoRA onto the base without the buffer. Reruns reuse finished stages."""
    fields = _fields(locals())
    from deltafix.io.writer import parse_size
    from deltafix.train.bufferlora import BufferLoraOptions, run_bufferlora

    fields["shard_size"] = parse_size(fields.pop("out_shard_size"))
    opts = _options(ctx, BufferLoraOptions, "bufferlora", recipe,
                    {**fields, "progress": not as_json, "command": shlex.join(["deltafix", *sys.argv[1:]])})
    report = run_bufferlora(opts)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for name, stage in report["stages"].items():
        typer.echo(f"{name}: {stage['status']} in {stage['seconds']:.1f}s -> {stage['path']}")
    skipped = ", ".join(report["skipped"]) or "none"
    typer.echo(f"skipped: {skipped}; wrote {report['output']['kind']} model {report['output']['path']} "
               f"in {report['total_seconds']:.1f}s")
