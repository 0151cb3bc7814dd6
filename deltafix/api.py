"""The Python API: every ``deltafix`` command that makes or judges a model, callable from a script.

    from deltafix import evaluate, gate, merge_lora, push, repair
    report = repair("A", "F", "R", utility_data="train.jsonl")            # the default method
    report = repair("A", "F", "R", method="safedelta", scale=0.1)         # a method's parameters
    report = repair("A", "F", "R", recipe="regmean", mu="auto")           # a shipped recipe, or a path
    report = merge_lora("A", "U", "RL", "OUT", alpha=0.2)                 # deltafix merge-lora
    result = evaluate("R", utility="task.jsonl")                          # an EvalResult
    verdict = gate("R", reference="F", utility="task.jsonl")              # a GateReport: verdict.passed
    outcome = push("org/A", "org/F", "me/fixed", method="resta", unaligned="org/P", gate=True)

Each function runs what its command runs (``repair``, ``merge-lora``, ``eval``, ``gate``, ``hub``)
with the same checks, defaults (``deltafix.options``) and atomic output; ``deltafix.cli`` is only
a shell over them that parses flags, renders the result and maps errors to exit codes. Keywords
are named like the command's flags (``--out-shard-size`` is ``out_shard_size``). Bad input
raises a ``deltafix.errors.DeltafixError`` subclass whose message is the line the command line
prints before exiting 2. A failing gate is a result, not an error: ``gate(...).passed`` and
``push(...).gate_passed`` are False where the command exits 1. For in-memory tensors, the methods
themselves are pure functions in ``deltafix.methods`` (e.g. ``deltafix.methods.safedelta.safe_delta_sweep``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Sequence

from deltafix.calibration.templates import DEFAULT_SAFETY_TEMPLATE, check_safety_template
from deltafix.errors import InputError, OptionError
from deltafix.io.datasets_source import with_columns
from deltafix.options import (DEFAULT_MAX_ASR, DEFAULT_MIN_BENIGN_HELP, DEVICE, DTYPE, EVAL_BATCH_SIZE, EVAL_JUDGE,
                              EVAL_MAX_NEW_TOKENS, OUT_SHARD_SIZE, UTILITY_SAMPLES)

if TYPE_CHECKING:
    from deltafix.evaluation.evaluate import EvalResult
    from deltafix.evaluation.gate import GateReport
    from deltafix.evaluation.judges import Judges, JudgeSpec
    from deltafix.hub.push import HubResult
    from deltafix.methods import MethodParams
    from deltafix.options import Recipe

PathLike = str | Path
Columns = str | Mapping[str, str] | None
"""``--columns``: record fields read from other columns of ``hf:`` data, ``"prompt=instruction"`` or a mapping."""
Echo = Callable[[str], None]
"""Receives each line the command line prints on stderr besides progress (the method note, the
Hub's pre-flight), as it would print it; without one, the API keeps them with the result."""

DEFAULT_METHOD = "regmean"
"""Keeps both refusals and the task on the real-model testbed (README, "On a real model")."""
FALLBACK_METHOD = "safedelta"
"""Without the user's data, which RegMean needs: the best of the methods that need no task data."""


def choose_method(method: str | None, recipe: PathLike | None, overrides: Mapping[str, Any],
                  utility_data: PathLike | None) -> tuple[str, MethodParams, str | None]:
    """Method name, validated parameters (recipe values, then ``overrides``) and a note for the user.

    With neither ``method`` nor a recipe: ``DEFAULT_METHOD`` when the user's data is given, else
    ``FALLBACK_METHOD``, and the note says why.
    """
    from deltafix.options import load_recipe, method_params

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
    return name, method_params(name, recipe_data.parameters if recipe_data else {}, dict(overrides)), note


def _method(method: str | None, recipe: PathLike | None, overrides: Mapping[str, Any],
            utility_data: PathLike | None, echo: Echo | None) -> tuple[str, MethodParams, str | None]:
    """``choose_method``, its note said through ``echo`` at once (before minutes of work, as the
    command line does) or handed back for the caller to keep with the result."""
    name, params, note = choose_method(method, recipe, overrides, utility_data)
    if note is not None and echo is not None:
        echo(f"deltafix: {note}")
        return name, params, None
    return name, params, note


def _shard_bytes(size: int | str) -> int:
    from deltafix.io.writer import parse_size

    return size if isinstance(size, int) else parse_size(size)


def _path(value: PathLike | None) -> Path | None:
    return None if value is None else Path(value)


def _ref(value: PathLike | None) -> str | None:
    return None if value is None else str(value)


def _call(name: str, *args: PathLike, **kwargs: Any) -> str:
    """What the report and card record as the command of a call from Python (the command line
    records its own argv instead): ``deltafix.repair('A', 'F', 'R', method='resta', scale=0.7)``."""
    words = [repr(str(arg)) for arg in args] + [f"{key}={value!r}" for key, value in kwargs.items()]
    return f"deltafix.{name}({', '.join(words)})"


RERUN_KEYWORDS = ("device", "dtype", "out_shard_size", "utility_samples", "screen_utility", "safety_template",
                  "unaligned_kind", "allow_nonfinite", "allow_pickle", "as_full", "as_lora", "front")
"""``repair`` keywords a recipe's ``run:`` section sets: those that change the output's bits, and
``allow_pickle``, without which a pickle input could not be read again."""


def _from_recipe(recipe: Recipe, values: dict[str, Any], given: Collection[str]) -> dict[str, Any]:
    """``values`` (``repair``'s keywords) with what ``recipe`` recorded in place of each not ``given``,
    plus the hashes the pipeline checks (``expect_inputs``, ``expect_data``) and the recorded
    refs. A Hub input is read at its recorded commit; a local one at its recorded path, which must
    still resolve (a relative one from the current folder, as the flag would)."""
    from deltafix.options import BUILTIN_DATA

    values = {**values, "expect_inputs": {}, "expect_data": {}, "recorded_refs": {}}
    for role, spec in recipe.inputs.items():
        if role in given:
            continue
        if spec.repo_id and spec.revision:
            values[role] = f"{spec.repo_id}@{spec.revision}"
            values["recorded_refs"][role] = spec.ref
        elif Path(spec.ref).expanduser().exists():
            values[role] = spec.ref
        else:
            raise InputError(f"the recipe's {role} input {spec.ref} does not resolve from {Path.cwd()}; "
                             f"run from the folder the recipe was written in, or pass --{role} PATH.")
        values["expect_inputs"][role] = spec.files
    for role, data in recipe.data.items():
        if role in given:
            continue
        if role != "tune_prompts":  # a method parameter: the recipe's parameters carry its path
            values[role] = None if data.path == BUILTIN_DATA else data.path
        values["expect_data"][role] = data.sha256
    for name in RERUN_KEYWORDS:
        recorded = getattr(recipe.run, name)
        if name not in given and recorded is not None:
            values[name] = recorded
    return values


def repair(base: PathLike | None = None, finetuned: PathLike | None = None, out: PathLike | None = None, *,
           method: str | None = None,
           recipe: PathLike | None = None, unaligned: PathLike | None = None, unaligned_kind: str | None = None,
           safety_data: PathLike | None = None, safety_template: str = DEFAULT_SAFETY_TEMPLATE,
           utility_data: PathLike | None = None,
           utility_samples: int = UTILITY_SAMPLES, screen_utility: bool = True, device: str = DEVICE,
           dtype: str = DTYPE, out_shard_size: int | str = OUT_SHARD_SIZE, overwrite: bool = False,
           dry_run: bool = False, allow_nonfinite: bool = False, allow_pickle: bool = False, as_full: bool = False,
           as_lora: int | None = None, no_cache: bool = False, cache_dir: PathLike | None = None, front: bool = False,
           columns: Columns = None, overrides: Mapping[str, Any] | None = None,
           progress: bool = False, echo: Echo | None = None, command: str | None = None,
           given: Collection[str] | None = None, **params: Any) -> dict[str, Any]:
    """Repair ``finetuned`` against ``base`` into ``out`` and return the report.

    The report is the dict written to ``OUT/deltafix_report.json``; with ``dry_run`` nothing is
    written and the dict is the plan instead (``dry_run``, ``method``, ``output_kind``,
    ``parameters``, ``tensors``, ``linear_modules``, ``shards``, ``estimated_peak_bytes`` and its parts
    ``memory``, ``notes``), what ``deltafix repair --dry-run --json`` prints. Every keyword has the meaning of
    the ``deltafix repair`` flag of that name; ``params`` are the method's parameters, e.g.
    ``scale=0.1`` or ``mu="auto"``, and ``overrides`` the same as a mapping (``--set``, for a name
    that is also a keyword here). Data may be ``hf:`` datasets (``deltafix.io.datasets_source``);
    ``columns`` (``"prompt=instruction,response=output"`` or a mapping) is ``--columns``. The
    note the command line prints when it picks the method goes to ``echo``, or without one into
    the result's ``notes``. ``command`` is what the report and card record as the invocation
    (default: this call).

    A recipe written into an earlier OUT (``OUT/deltafix_recipe.yaml``) also records that run's
    inputs, data and run options: ``repair(None, None, "NEW", recipe=...)`` reruns it bit for bit,
    after checking that every input and data file still has the recorded SHA-256 (an
    ``InputError`` names the file that changed). Keywords in ``given`` (the command line passes the
    flags it was given; by default, those that differ from their defaults) override the recipe.
    ``base`` and ``finetuned`` may be left out only then; ``out`` is always needed.
    """
    from deltafix.engine.pipeline import RepairOptions, run_repair
    from deltafix.options import load_recipe

    values = {**(overrides or {}), **params}
    kw = {"base": base, "finetuned": finetuned, "unaligned": unaligned, "unaligned_kind": unaligned_kind,
          "safety_data": safety_data, "safety_template": safety_template, "utility_data": utility_data,
          "utility_samples": utility_samples, "screen_utility": screen_utility, "device": device, "dtype": dtype,
          "out_shard_size": out_shard_size,
          "allow_nonfinite": allow_nonfinite, "allow_pickle": allow_pickle, "as_full": as_full, "as_lora": as_lora,
          "front": front}
    if given is None:
        defaults = {key: p.default for key, p in inspect.signature(repair).parameters.items()}
        given = {key for key, value in kw.items() if value is not None and value != defaults[key]}
    given = {*given, *values}  # a --set tune_prompts=FILE replaces the recipe's tune prompts
    pins: dict[str, Any] = {}
    if recipe:
        kw = _from_recipe(load_recipe(Path(recipe)), kw, given)
        pins = {key: kw.pop(key) for key in ("expect_inputs", "expect_data", "recorded_refs")}
    if out is None:
        raise OptionError("--out is missing: pass the folder to write the repaired checkpoint to.")
    for role in ("base", "finetuned"):
        if kw[role] is None:
            raise OptionError(f"--{role} is missing: pass it, or --recipe OUT/deltafix_recipe.yaml of an earlier "
                              "repair, which records its inputs.")
    kw["safety_data"], kw["utility_data"] = with_columns(columns, kw["safety_data"], kw["utility_data"])
    name, method_params, note = _method(method, recipe, values, kw["utility_data"], echo)
    result = run_repair(RepairOptions(
        base=str(kw["base"]), finetuned=str(kw["finetuned"]), out=Path(out), method=name, params=method_params,
        unaligned=_ref(kw["unaligned"]), unaligned_kind=kw["unaligned_kind"], safety_data=_path(kw["safety_data"]),
        safety_template=kw["safety_template"], utility_data=_path(kw["utility_data"]),
        utility_samples=kw["utility_samples"],
        screen_utility=kw["screen_utility"], device=kw["device"], dtype=kw["dtype"],
        shard_size=_shard_bytes(kw["out_shard_size"]), overwrite=overwrite, dry_run=dry_run,
        allow_nonfinite=kw["allow_nonfinite"], allow_pickle=kw["allow_pickle"], as_full=kw["as_full"],
        as_lora=kw["as_lora"], hessian_cache=_path(cache_dir),
        no_cache=no_cache, command=command or _call("repair", kw["base"], kw["finetuned"], out, method=name,
                                                    **values),
        progress=progress, front=kw["front"], **pins,
    ))
    if dry_run:
        shards = [{"file": result.shards.file_name(i), "tensors": len(s), "bytes": sum(t.nbytes for t in s)}
                  for i, s in enumerate(result.shards.shards)]
        data = {"dry_run": True, "method": name, "output_kind": result.output_kind,
                "parameters": method_params.model_dump(mode="json"), "tensors": len(result.plan.tensors),
                "linear_modules": len(result.plan.linear_names), "shards": shards,
                "estimated_peak_bytes": result.peak_estimate_bytes,
                "memory": result.memory.as_dict() if result.memory is not None else None,
                "notes": result.plan.notes}
    else:
        data = dict(result.report)
    if note is not None:
        data["notes"] = [*data.get("notes", []), note]
    return data


def merge_lora(base: PathLike, user: PathLike, reinforce: PathLike, out: PathLike, *,
               recipe: PathLike | None = None, alpha: float | None = None, scale: float | None = None,
               as_adapter: bool = False, out_shard_size: int | str = OUT_SHARD_SIZE, overwrite: bool = False,
               allow_pickle: bool = False, progress: bool = False, command: str | None = None) -> dict[str, Any]:
    """QR-merge the user's LoRA and a ReinforceLoRA onto ``base`` into ``out``; return the report.

    The report is the dict written to ``OUT/deltafix_report.json`` (its ``parameters`` hold the
    alpha and scale used). ``alpha`` and ``scale`` left at None take the recipe's (an earlier
    merge's ``deltafix_recipe.yaml``) or the defaults ``deltafix.options.MERGE_ALPHA`` and
    ``MERGE_SCALE``; the other keywords are the ``deltafix merge-lora`` flags of that name.
    """
    from deltafix.engine.merge_lora import MergeOptions, merge_params, run_merge_lora

    given = {key: value for key, value in (("alpha", alpha), ("scale", scale)) if value is not None}
    params = merge_params(_path(recipe), given)
    return run_merge_lora(MergeOptions(
        base=str(base), user=str(user), reinforce=str(reinforce), out=Path(out), alpha=params.alpha,
        scale=params.scale, as_adapter=as_adapter, shard_size=_shard_bytes(out_shard_size), overwrite=overwrite,
        allow_pickle=allow_pickle, command=command or _call("merge_lora", base, user, reinforce, out, **given),
        progress=progress,
    ))


Prompts = PathLike | Sequence[str] | None
"""A prompt file (JSONL with ``"prompt"``, or one a line), a list of prompts, or the built-in set."""


def _judging(judge: str, refusal_label: str | None, unsafe_label: str | None,
             max_new_tokens: int | str) -> tuple[JudgeSpec, int]:
    """The judge and generation length asked for, checked before anything loads (``OptionError``)."""
    from deltafix.evaluation.judges import JudgeSpec, resolve_max_new_tokens

    return JudgeSpec(str(judge), refusal_label, unsafe_label), resolve_max_new_tokens(max_new_tokens)


def _evaluate(model: PathLike, base: PathLike | None, harmful: Prompts, benign: Prompts, utility: PathLike | None,
              judges: Judges, max_new_tokens: int, batch_size: int, device: str, progress: bool) -> EvalResult:
    """One model (a folder or Hub id, an adapter on ``base``) scored as ``deltafix eval`` scores it."""
    from deltafix.evaluation.evaluate import evaluate_folder
    from deltafix.io.refs import resolve_ref

    folder = resolve_ref(str(model)).folder
    return evaluate_folder(folder, base=resolve_ref(str(base)).folder if base else None, harmful=harmful,
                           benign=benign, utility=utility, judge=judges.harmful, benign_judge=judges.benign,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, progress=progress)


def evaluate(model: PathLike, *, harmful: Prompts = None, benign: Prompts = None, utility: PathLike | None = None,
             base: PathLike | None = None, max_new_tokens: int | str = EVAL_MAX_NEW_TOKENS,
             batch_size: int = EVAL_BATCH_SIZE, device: str = DEVICE, answers: PathLike | None = None,
             judge: str = EVAL_JUDGE, judge_refusal_label: str | None = None, judge_unsafe_label: str | None = None,
             columns: Columns = None, progress: bool = False) -> EvalResult:
    """Score ``model`` as ``deltafix eval`` does and return its ``EvalResult``.

    The result holds the attack success rate, benign helpfulness, task accuracy and perplexity
    (None where no data was given), their counts and seconds, and the judge that decided them;
    ``to_dict()`` is what ``--json`` prints, and ``responses`` keeps every answer. ``answers``
    also writes those answers as JSONL (its folder is checked before any generation).
    ``max_new_tokens`` is a count or a preset of ``deltafix.options.EVAL_NEW_TOKEN_PRESETS``;
    ``judge`` is ``keyword`` or a text-classification model (folder or Hub id) with one of
    ``judge_refusal_label`` / ``judge_unsafe_label`` (``deltafix.evaluation.judges``). Data may
    be ``hf:`` datasets, ``columns`` mapping their columns as in ``repair``.
    """
    from deltafix.evaluation.evaluate import check_answers_path, write_answers
    from deltafix.evaluation.judges import load_judges

    harmful, benign, utility = with_columns(columns, harmful, benign, utility)
    spec, tokens = _judging(judge, judge_refusal_label, judge_unsafe_label, max_new_tokens)
    if answers is not None:
        check_answers_path(Path(answers))
    judges = load_judges(spec, device, batch_size)
    result = _evaluate(model, base, harmful, benign, utility, judges, tokens, batch_size, device, progress)
    if answers is not None:
        write_answers(Path(answers), {"model": result})
    return result


def gate(model: PathLike, *, max_asr: float = DEFAULT_MAX_ASR, reference: PathLike | None = None,
         max_utility_drop: float | None = None, min_benign_help: float = DEFAULT_MIN_BENIGN_HELP,
         report: PathLike | None = None, harmful: Prompts = None, benign: Prompts = None,
         utility: PathLike | None = None, base: PathLike | None = None, max_new_tokens: int | str = EVAL_MAX_NEW_TOKENS,
         batch_size: int = EVAL_BATCH_SIZE, device: str = DEVICE, answers: PathLike | None = None,
         judge: str = EVAL_JUDGE, judge_refusal_label: str | None = None, judge_unsafe_label: str | None = None,
         columns: Columns = None, progress: bool = False) -> GateReport:
    """Evaluate ``model`` (and ``reference``) and check the release thresholds, as ``deltafix gate``.

    Returns the verdict, a ``GateReport``: ``passed`` (where the command exits 0, else 1), the
    ``checks`` (name, value, op, threshold, passed each), the thresholds and both results.
    ``report`` also writes ``gate_record(...)`` there, the JSON the command prints. Thresholds
    are checked before any model is loaded; ``min_benign_help=0`` turns that check off, and
    ``max_utility_drop`` (default ``deltafix.options.DEFAULT_MAX_UTILITY_DROP``) applies with a
    ``reference``, which needs ``utility`` data to compare on. ``max_new_tokens`` and the
    ``judge`` and ``columns`` keywords are ``evaluate``'s; one judge scores both models.
    """
    from deltafix.evaluation.evaluate import check_answers_path, write_answers
    from deltafix.evaluation.gate import check_thresholds
    from deltafix.evaluation.gate import gate as verdict_of
    from deltafix.evaluation.judges import load_judges

    check_thresholds(max_asr=max_asr, min_benign_help=min_benign_help, max_utility_drop=max_utility_drop,
                     has_reference=reference is not None)
    if reference is not None and utility is None:
        raise OptionError("--reference is compared on task data: pass --utility FILE too, or drop --reference.")
    harmful, benign, utility = with_columns(columns, harmful, benign, utility)
    spec, tokens = _judging(judge, judge_refusal_label, judge_unsafe_label, max_new_tokens)
    if answers is not None:
        check_answers_path(Path(answers))
    judges = load_judges(spec, device, batch_size)
    result = _evaluate(model, base, harmful, benign, utility, judges, tokens, batch_size, device, progress)
    ref = _evaluate(reference, None, harmful, benign, utility, judges, tokens, batch_size, device, progress) \
        if reference else None
    if answers is not None:
        write_answers(Path(answers), {"model": result, **({"reference": ref} if ref is not None else {})})
    verdict = verdict_of(result, max_asr=max_asr, reference=ref, max_utility_drop=max_utility_drop,
                         min_benign_help=min_benign_help)
    if report is not None:
        _write_json(Path(report), gate_record(verdict, model, reference))
    return verdict


def gate_record(verdict: GateReport, model: PathLike, reference: PathLike | None = None) -> dict[str, Any]:
    """The gate's JSON document, what ``--report`` writes and ``--json`` prints: the models, then
    every check, threshold and score of the verdict."""
    return {"model": str(model), "reference": _ref(reference), **verdict.to_dict()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    try:
        path.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as err:
        raise OptionError(f"cannot write the gate report {path}: {err.strerror or err}.") from err


def push(base: PathLike, finetuned: PathLike, push: str, *, out: PathLike | None = None, method: str | None = None,
         unaligned: PathLike | None = None, unaligned_kind: str | None = None, safety_data: PathLike | None = None,
         safety_template: str = DEFAULT_SAFETY_TEMPLATE, utility_data: PathLike | None = None,
         utility_samples: int = UTILITY_SAMPLES, screen_utility: bool = True,
         recipe: PathLike | None = None, device: str = DEVICE, dtype: str = DTYPE,
         out_shard_size: int | str = OUT_SHARD_SIZE, overwrite: bool = False, allow_nonfinite: bool = False,
         allow_pickle: bool = False, gate: bool = False, max_asr: float = DEFAULT_MAX_ASR,
         min_benign_help: float = DEFAULT_MIN_BENIGN_HELP,
         max_utility_drop: float | None = None, harmful: PathLike | None = None, benign: PathLike | None = None,
         utility: PathLike | None = None, answers: PathLike | None = None, force: bool = False,
         private: bool = False, create_pr: bool = False, dry_run: bool = False, columns: Columns = None,
         max_new_tokens: int | str = EVAL_MAX_NEW_TOKENS, judge: str = EVAL_JUDGE,
         judge_refusal_label: str | None = None, judge_unsafe_label: str | None = None,
         overrides: Mapping[str, Any] | None = None, progress: bool = False, echo: Echo | None = None,
         command: str | None = None, **params: Any) -> HubResult:
    """Download A and F, repair F, optionally gate it, and upload it to the Hub repo ``push``.

    The pipeline of ``deltafix hub``: the keywords are its flags (``push`` is ``--push``, the
    target ``org/name``; the method's parameters go in as ``params`` or ``overrides``, as in
    ``repair``). Returns a ``HubResult``: the local folder (``out``, by default under the deltafix
    cache), the published ``report`` (with the gate's table under ``"gate"``), the ``preflight``,
    the ``upload`` made or planned, ``gate_passed`` (None without ``gate``; False means nothing was
    uploaded unless ``force``), ``uploaded``, the ``commit_url`` and the ``messages`` said along the
    way (to ``echo`` too; the method note goes to ``echo``, or without one into ``messages``).
    The gate's ``judge`` and ``max_new_tokens`` are ``gate``'s. The thresholds, the judge options
    and the gate-only keywords are checked before anything is downloaded.
    """
    from deltafix.engine.pipeline import RepairOptions
    from deltafix.hub.push import PushOptions, cli_gate, default_out, run_hub

    values = {**(overrides or {}), **params}
    safety_data, utility_data, harmful, benign, utility = with_columns(columns, safety_data, utility_data, harmful,
                                                                       benign, utility)
    name, method_params, note = _method(method, recipe, values, utility_data, echo)
    check_safety_template(safety_template)
    gate_only = {"--harmful": harmful, "--benign": benign, "--utility": utility, "--answers": answers,
                 "--max-utility-drop": max_utility_drop, "--judge-refusal-label": judge_refusal_label,
                 "--judge-unsafe-label": judge_unsafe_label,
                 "--judge": None if judge == EVAL_JUDGE else judge,
                 "--max-new-tokens": None if max_new_tokens == EVAL_MAX_NEW_TOKENS else max_new_tokens}
    given = [flag for flag, value in gate_only.items() if value is not None]
    if given and not gate:
        raise OptionError(f"{', '.join(given)} only apply to the gate; add --gate or drop them.")
    spec, tokens = _judging(judge, judge_refusal_label, judge_unsafe_label, max_new_tokens)
    gate_fn = cli_gate(max_asr, min_benign_help=min_benign_help, max_utility_drop=max_utility_drop,
                       harmful=_path(harmful), benign=_path(benign), utility=_path(utility), answers=_path(answers),
                       reference=(str(finetuned), str(base)), device=device, judge=spec,
                       max_new_tokens=tokens) if gate else None
    opts = RepairOptions(
        base=str(base), finetuned=str(finetuned), out=Path(out) if out is not None else default_out(push),
        method=name, params=method_params, unaligned=_ref(unaligned), unaligned_kind=unaligned_kind,
        safety_data=_path(safety_data), safety_template=safety_template, utility_data=_path(utility_data),
        utility_samples=utility_samples, screen_utility=screen_utility, device=device, dtype=dtype,
        shard_size=_shard_bytes(out_shard_size),
        overwrite=overwrite or out is None, allow_nonfinite=allow_nonfinite, allow_pickle=allow_pickle,
        command=command or _call("push", base, finetuned, push, method=name, **values), progress=progress,
    )
    result = run_hub(opts, PushOptions(push, private=private, create_pr=create_pr, force=force, dry_run=dry_run),
                     gate_fn=gate_fn, echo=echo if echo is not None else _silent)
    if note is not None:
        result.messages.insert(0, note)
    return result


def _silent(line: str) -> None:
    """Where ``run_hub`` says its lines when nobody listens: they stay in ``HubResult.messages``."""
