"""The repair pipeline: resolve -> read -> plan -> per-tensor method -> sharded write -> publish.

Data flows one way and streams tensor by tensor; only the method sees tensors in fp32 on the
compute device, and only the writer touches OUT (through a temporary folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deltafix import __version__
from deltafix.options import BUILTIN_DATA, RecipeData, RecipeInput, RecipeRun, recipe_yaml
from deltafix.options import DEVICE, DTYPE, OUT_SHARD_BYTES, UTILITY_SAMPLES
from deltafix.builtin_data import HARMFUL_TUNE, SAFETY_CALIBRATION
from deltafix.calibration.templates import DEFAULT_SAFETY_TEMPLATE, SafetyTemplate, check_safety_template
from deltafix.env import progress_bars, resolve_device, resolve_dtype, usable_cores
from deltafix.errors import InputError, OptionError
from deltafix.engine.grams import method_hessians, refused_by_aligned
from deltafix.engine.adapter import repair_adapter_factors
from deltafix.engine.extract import check_rank, extract_lora, say_what_the_adapter_left_out
from deltafix.io.assets import copy_assets
from deltafix.io.datasets_source import describe_dataset, is_dataset_ref
from deltafix.io.hashing import file_sha256
from deltafix.io.overlay import AdapterCheckpoint, open_finetuned
from deltafix.io.pickled import PickleCheckpoint, open_checkpoint
from deltafix.io.reader import CheckpointReader, TensorIndex
from deltafix.io.refs import ResolvedRef, resolve_ref
from deltafix.io.staging import remove_stale
from deltafix.io.writer import ShardedWriter, ShardPlan, atomic_output, check_output_location
from deltafix.methods import Method, MethodParams, get_method, method_names
from deltafix.engine.plan import Plan, build_plan
from deltafix.engine.report import input_record, run_report, write_provenance
from deltafix.engine.memory import MemoryEstimate, estimate_memory, streaming_bytes
from deltafix.engine.stream import repaired_tensors, streams_in_pieces

if TYPE_CHECKING:
    from deltafix.engine.grams import Hessians

UNALIGNED_KINDS = ("base", "harmful-finetune")
"""What the user says P is: the pre-alignment base, or A fine-tuned on harmful data, which is how
RESTA's paper makes its unaligned model. Either defines the alignment direction θ_A − θ_P."""
FRONT_SAMPLES = 64
"""User-data samples scored at each point of a ``--front`` (the fine-tuning loss is a mean: 64 is plenty)."""
MAX_HASH_THREADS = 4
"""Most input files hashed at once for the report (sha256 runs at about 1.2 GB/s on one core)."""


@dataclass
class RepairOptions:
    """Everything one ``deltafix repair`` run needs; the CLI fills it, tests may too."""

    base: str
    finetuned: str
    out: Path
    method: str
    params: MethodParams
    unaligned: str | None = None
    unaligned_kind: str | None = None
    safety_data: Path | None = None
    safety_template: SafetyTemplate = DEFAULT_SAFETY_TEMPLATE
    """The system prompts the safety set is shown under (``deltafix.calibration.templates``)."""
    utility_data: Path | None = None
    utility_samples: int | None = UTILITY_SAMPLES
    screen_utility: bool = True
    device: str = DEVICE
    dtype: str = DTYPE
    shard_size: int = OUT_SHARD_BYTES
    overwrite: bool = False
    dry_run: bool = False
    allow_nonfinite: bool = False
    allow_pickle: bool = False
    as_full: bool = False
    as_lora: int | None = None
    """Write the repaired delta of each decoder Linear as a rank-``as_lora`` LoRA adapter on A
    (``deltafix.engine.extract``); None writes the full checkpoint."""
    hessian_cache: Path | None = None
    no_cache: bool = False
    command: str = ""
    progress: bool = True
    front: bool = False
    expect_inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per input role (``base``, ``finetuned``, ``unaligned``), the SHA-256 of each weight file a
    recipe recorded: checked before any heavy work, so a rerun cannot silently read other weights."""
    expect_data: dict[str, str] = field(default_factory=dict)
    """Per data role (``safety_data``, ``utility_data``, ``tune_prompts``), the recorded SHA-256."""
    recorded_refs: dict[str, str] = field(default_factory=dict)
    """Per input role, the text a recipe recorded: a rerun reads a Hub input at its recorded commit
    (``org/name@sha``) but writes the user's original text back, so its recipe equals the first."""


INPUT_READERS = {"base": "aligned", "finetuned": "finetuned", "unaligned": "unaligned"}
"""Recipe input role (the flag's name) -> the reader's role in ``Inputs.readers``."""


@dataclass
class RepairResult:
    """What a run did: the plan, the shard layout and (unless dry-run) the report written to OUT.

    ``peak_estimate_bytes``: a dry run's estimate of the run's peak host memory, whose parts are
    ``memory``; a real run measures its peak instead (the report's ``peak_rss_bytes``) and carries
    the streaming loop's share only, which costs nothing to compute.
    """

    plan: Plan
    shards: ShardPlan
    peak_estimate_bytes: int
    memory: MemoryEstimate | None = None
    output_kind: str = "full"
    report: dict[str, Any] = field(default_factory=dict)
    written: bool = False


@dataclass
class Inputs:
    aligned: ResolvedRef
    finetuned: ResolvedRef
    unaligned: ResolvedRef | None
    readers: dict[str, TensorIndex]
    data: dict[str, RecipeData] = field(default_factory=dict)
    """The data files the run reads, by role, with their SHA-256 (``data_files``)."""


def open_inputs(opts: RepairOptions) -> Inputs:
    refs = {"aligned": resolve_ref(opts.base), "finetuned": resolve_ref(opts.finetuned)}
    if opts.unaligned:
        refs["unaligned"] = resolve_ref(opts.unaligned)
    aligned = open_checkpoint(refs["aligned"].folder, opts.allow_pickle)
    readers: dict[str, TensorIndex] = {
        "aligned": aligned,
        "finetuned": open_finetuned(refs["finetuned"].folder, aligned, opts.allow_pickle),
    }
    if "unaligned" in refs:
        readers["unaligned"] = open_checkpoint(refs["unaligned"].folder, opts.allow_pickle)
    return Inputs(refs["aligned"], refs["finetuned"], refs.get("unaligned"), readers)


def output_kind(method: Method, inputs: Inputs, as_full: bool) -> str:
    """``adapter`` when F is a plain LoRA adapter and the method keeps low rank, else ``full``."""
    finetuned = inputs.readers["finetuned"]
    if isinstance(finetuned, AdapterCheckpoint) and method.keeps_low_rank and not as_full \
            and not finetuned.adapter.is_dora:
        return "adapter"
    return "full"


def estimate_peak_bytes(plan: Plan, n_inputs: int, pieces: bool = False) -> int:
    """The streaming loop's host memory (``memory.streaming_bytes``): all that headers tell, so
    what the hub's preflight shows before downloading; a dry run adds the baseline, calibration
    and the rest (``estimate_dry_run``)."""
    return streaming_bytes(plan, n_inputs, pieces)


def estimate_dry_run(opts: RepairOptions, method: Method, inputs: Inputs, plan: Plan, pieces: bool,
                     output: str) -> MemoryEstimate:
    """Every part of the run's peak host memory (``deltafix.engine.memory``), for ``--dry-run``."""
    params = opts.params
    tune = opts.front or (method.tune is not None and getattr(params, method.tune.param) == "auto")
    hessians = method.needs_hessian and output != "adapter"
    return estimate_memory(plan, len(inputs.readers), pieces, method, params, aligned=inputs.aligned.folder,
                           finetuned=inputs.finetuned.folder, safety_data=opts.safety_data,
                           safety_template=opts.safety_template,
                           utility_data=opts.utility_data, utility_samples=opts.utility_samples,
                           screen_utility=opts.screen_utility, no_cache=opts.no_cache, tune=tune,
                           calibrates=hessians)


def _input_record(ref: ResolvedRef, reader: TensorIndex, digests: dict[Path, Future[str]]) -> dict[str, Any]:
    record = input_record(ref.ref, ref.repo_id, ref.revision, {f.name: digests[f].result() for f in reader.files})
    if isinstance(reader, (PickleCheckpoint, AdapterCheckpoint)) and reader.pickle_files:
        record["converted_from_pickle"] = reader.pickle_files  # the hashes are of the safetensors made from these
    return record


def run_repair(opts: RepairOptions) -> RepairResult:
    """Validate everything, then (unless dry-run) stream the repair into OUT atomically."""
    started = time.perf_counter()
    check_rank(opts.as_lora, opts.as_full)
    method = get_method(opts.method)
    if method.needs_unaligned and not opts.unaligned:
        raise OptionError(
            f"method {method.name} uses the alignment direction θ_A − θ_P; pass the pre-alignment base with --unaligned."
        )
    if opts.unaligned_kind is not None:
        if opts.unaligned_kind not in UNALIGNED_KINDS:
            raise OptionError(f"--unaligned-kind {opts.unaligned_kind!r} is not one of {', '.join(UNALIGNED_KINDS)}.")
        if not opts.unaligned:
            raise OptionError("--unaligned-kind says what --unaligned is; pass --unaligned P too, or drop it.")
    check_safety_template(opts.safety_template)
    data = data_files(opts, method)
    inputs = open_inputs(opts)
    inputs.data = data
    check_output_location(opts.out, [ref.folder for ref in (inputs.aligned, inputs.finetuned, inputs.unaligned)
                                     if ref is not None], opts.overwrite)
    out_dtype = resolve_dtype(opts.dtype)
    device = resolve_device(opts.device)
    plan = build_plan(inputs.readers["aligned"], inputs.readers["finetuned"], inputs.readers.get("unaligned"),
                      out_dtype)
    shards = ShardPlan.build(list(plan.tensors), opts.shard_size)
    pieces = streams_in_pieces(method, opts.params, inputs.readers)
    result = RepairResult(plan, shards, estimate_peak_bytes(plan, len(inputs.readers), pieces),
                          output_kind="lora" if opts.as_lora is not None
                          else output_kind(method, inputs, opts.as_full))
    if opts.dry_run:
        result.memory = estimate_dry_run(opts, method, inputs, plan, pieces, result.output_kind)
        result.peak_estimate_bytes = result.memory.peak_bytes
        _say_what_the_method_does_not_read(opts, method)
        return result

    remove_stale(opts.out)
    with progress_bars(opts.progress):
        _write(opts, method, inputs, plan, shards, device, result, started)
    for reader in inputs.readers.values():
        reader.close()
    result.written = True
    _say_what_the_method_does_not_read(opts, method)  # after success only: a refusal stays one error line
    return result


def _write(opts: RepairOptions, method: Method, inputs: Inputs, plan: Plan, shards: ShardPlan, device: torch.device,
           result: RepairResult, started: float) -> None:
    """Calibrate, repair and publish OUT, hashing the inputs for the report on the side."""
    hasher = ThreadPoolExecutor(max_workers=min(MAX_HASH_THREADS, usable_cores()), thread_name_prefix="deltafix-sha256")
    try:
        digests = {f: hasher.submit(file_sha256, f) for r in inputs.readers.values() for f in r.files}
        check_input_hashes(opts, inputs, digests)
        if result.output_kind == "adapter":
            result.report = _repair_adapter_into(opts, method, inputs, plan, shards, device, digests, started)
        else:
            hessians = method_hessians(method, opts.params, inputs.aligned.folder, inputs.finetuned.folder,
                                       inputs.readers["finetuned"], safety_data=opts.safety_data,
                                       safety_template=opts.safety_template,
                                       utility_data=opts.utility_data, device=device,
                                       cache_dir=opts.hessian_cache, no_cache=opts.no_cache,
                                       utility_samples=opts.utility_samples, screen_utility=opts.screen_utility)
            _say_what_the_screen_left_out(hessians)
            try:
                result.report = _repair_into(opts, method, inputs, plan, shards, device, hessians, digests, started)
            finally:
                hessians.close()
    finally:
        hasher.shutdown(wait=False, cancel_futures=True)


def data_files(opts: RepairOptions, method: Method) -> dict[str, RecipeData]:
    """Each data file the run reads, as the recipe records it: the user's path (or ``builtin``)
    and its SHA-256, checked against ``opts.expect_data``. A user's file is recorded whenever it is
    given; a built-in set when the method reads it (safety data for a calibrated method, tune
    prompts for an ``auto`` budget or a ``--front``). Small files: hashed here, before the inputs;
    an ``hf:`` dataset is loaded here to hash its records (``deltafix.io.datasets_source``)."""
    tune_file = getattr(opts.params, "tune_prompts", None)
    tunes = opts.front or (method.tune is not None and getattr(opts.params, method.tune.param) == "auto")
    wanted: dict[str, tuple[str, Path]] = {}
    if opts.safety_data is not None or method.needs_hessian:
        wanted["safety_data"] = (str(opts.safety_data), opts.safety_data) if opts.safety_data is not None \
            else (BUILTIN_DATA, SAFETY_CALIBRATION)
    if opts.utility_data is not None:
        wanted["utility_data"] = (str(opts.utility_data), opts.utility_data)
    if tune_file is not None or tunes:
        wanted["tune_prompts"] = (tune_file, Path(tune_file)) if tune_file is not None \
            else (BUILTIN_DATA, HARMFUL_TUNE)
    records: dict[str, RecipeData] = {}
    for role, (shown, path) in wanted.items():
        expected = opts.expect_data.get(role)
        if is_dataset_ref(shown):  # an hf: dataset: the sha256 of its records, and what it resolved to
            loaded = describe_dataset(shown, role.replace("_", " "))
            digest, source = loaded.sha256, loaded.recipe_fields()
        elif not path.is_file():
            if expected is not None:
                raise InputError(f"{role} {shown} from the recipe is no file here ({path.resolve()}); "
                                 f"pass --{role.replace('_', '-')} FILE or run from the recipe's folder.")
            continue  # the reader of this file says what is wrong with it, as without a recipe
        else:
            digest, source = file_sha256(path), {}
        if expected is not None and digest != expected:
            raise InputError(f"{role} {path} changed since the recipe was written: sha256 {digest}, "
                             f"the recipe has {expected}.")
        records[role] = RecipeData(path=shown, sha256=digest, **source)
    return records


def check_input_hashes(opts: RepairOptions, inputs: Inputs, digests: dict[Path, Future[str]]) -> None:
    """Wait for the hashes of every input a recipe pinned and refuse one that changed, before any
    heavy work: the report's hashing threads do the work, so a rerun hashes each file once."""
    for role, expected in opts.expect_inputs.items():
        files = {f.name: f for f in inputs.readers[INPUT_READERS[role]].files}
        if sorted(files) != sorted(expected):
            raise InputError(f"{role} holds weight files {', '.join(sorted(files))}, the recipe has "
                             f"{', '.join(sorted(expected))}; it is not the input the recipe was written from.")
        for name, path in files.items():
            digest = digests[path].result()
            if digest != expected[name]:
                raise InputError(f"{role} file {path} changed since the recipe was written: sha256 {digest}, "
                                 f"the recipe has {expected[name]}.")


SCREEN_NOTE_SHARE = 0.25
"""Above this share of the picked conversations left out, the screen says so: A may be refusing the task."""


def _say_what_the_method_does_not_read(opts: RepairOptions, method: Method) -> None:
    """One stderr line naming the data flags given that this method (and run) never reads: a user who
    passes --utility-data to asft should not believe their task data shaped the repair."""
    unused = [flag for flag, given, read in (
        ("--safety-data", opts.safety_data is not None, method.needs_hessian),
        ("--safety-template", opts.safety_template != DEFAULT_SAFETY_TEMPLATE, method.needs_hessian),
        ("--utility-data", opts.utility_data is not None, method.needs_utility or opts.front),
    ) if given and not read]
    if unused:
        print(f"deltafix: {method.name} does not read {' or '.join(unused)}; "
              f"{'it was' if len(unused) == 1 else 'they were'} not used.", file=sys.stderr)


def _say_what_the_screen_left_out(hessians: Hessians) -> None:
    """One stderr line when the screen left out much of the user's data (even with --json: stdout stays clean)."""
    data = hessians.utility_set
    if data is None:
        return
    dropped, picked = len(data.screened_out), len(data.screened_out) + len(data.samples)
    if dropped > SCREEN_NOTE_SHARE * picked:
        print(f"deltafix: the screen left out {dropped} of {picked} conversations of --utility-data whose request "
              "the aligned model refuses (lines in the report); if they are your task rather than harm, "
              "pass --no-screen-utility.", file=sys.stderr)


def _tune(opts: RepairOptions, method: Method, inputs: Inputs, plan: Plan, device: torch.device,
          hessians: Hessians) -> tuple[MethodParams, dict[str, Any] | None, dict[str, Any] | None]:
    """Resolve the method's ``auto`` knob (``autotune``) and, with ``--front``, sweep it (``trade_off_front``).

    Returns the concrete parameters, the auto-tune record and the front (None where not asked).
    Both hold one model in memory: each probe loads a repaired state dict into it and generates
    on the tune prompts.
    """
    spec = method.tune
    wants_auto = spec is not None and getattr(opts.params, spec.param) == "auto"
    if not (wants_auto or opts.front):
        return opts.params, None, None
    if spec is None:
        raise OptionError(f"method {method.name} has no knob to sweep; --front works with "
                          f"{', '.join(n for n in method_names() if get_method(n).tune is not None)}.")
    if opts.front and opts.utility_data is None:
        raise OptionError("--front scores each point by the fine-tuning loss on your data: pass --utility-data FILE.")
    from deltafix.engine.autotune import (answered, autotune, by_style, mean_token_nll, share, trade_off_front,
                                          tune_prompts)
    from deltafix.evaluation.evaluate import JUDGE_NEW_TOKENS, evaluate_model, load_for_eval, quiet_transformers
    from deltafix.methods.registry import AutoTuneParams

    skeleton = inputs.aligned.folder if isinstance(inputs.readers["finetuned"], AdapterCheckpoint) \
        else inputs.finetuned.folder
    with quiet_transformers():
        model, tokenizer = load_for_eval(skeleton, device=str(device))
    assert isinstance(opts.params, AutoTuneParams)
    tune = tune_prompts(opts.params.tune_prompts)

    def repaired(params: MethodParams) -> dict[str, torch.Tensor]:
        return {planned.name: tensor for planned, tensor, _ in
                repaired_tensors(method, params, inputs.readers, plan, device, check_finite=False, hessians=hessians)}

    def asr_of(candidate: torch.nn.Module, harmful: list[str]) -> list[bool]:
        result = evaluate_model(candidate, tokenizer, harmful=harmful, benign=[], max_new_tokens=JUDGE_NEW_TOKENS,
                                progress=False)
        return [not r["refused"] for r in result.responses]

    echo = (lambda line: print(line, file=sys.stderr, flush=True)) if opts.progress else (lambda _: None)
    front = None
    measured: dict[float, list[bool]] = {}
    if opts.front:
        assert opts.utility_data is not None
        samples = _front_samples(opts, inputs, hessians, tokenizer, device)
        front = trade_off_front(method, opts.params, model, repaired, tune, asr_of,  # a result: even with --json
                                lambda m: mean_token_nll(m, samples), lambda line: print(line, file=sys.stderr),
                                outcomes=measured)
    if not wants_auto:
        front["chosen"] = getattr(opts.params, spec.param)
        return opts.params, None, front
    aligned = None
    if opts.params.target_from == "aligned":
        aligned = answered(model, _aligned_state(inputs, plan), tune, asr_of)
        styles = ", ".join(f"{style} {asr:.3f}" for style, asr in by_style(aligned, tune.styles).items())
        echo(f"auto {method.name}: the aligned model answers {share(aligned):.3f} of the tune prompts"
             + (f" ({styles})" if styles else "")
             + f"; target: that + {opts.params.target_asr:g}" + (", overall and per style" if styles else ""))
    params, tuning = autotune(method, opts.params, model, repaired, tune, asr_of, echo, aligned=aligned,
                              known=measured)
    if front is not None:
        front["chosen"] = getattr(params, spec.param)
    return params, tuning, front


def _front_samples(opts: RepairOptions, inputs: Inputs, hessians: Hessians, tokenizer: Any,
                   device: torch.device) -> list[torch.Tensor]:
    """``FRONT_SAMPLES`` conversations of the user's data, evenly spaced, to score each front point.

    A method calibrated on the user's data has them rendered and screened already; screening
    again would run A over the data a second time (about a minute on the real testbed).
    """
    from deltafix.calibration.render import evenly_spaced, load_calibration

    if hessians.utility_set is not None:
        rendered = hessians.utility_set.samples
        return [rendered[i] for i in evenly_spaced(len(rendered), FRONT_SAMPLES)]
    assert opts.utility_data is not None
    screen = refused_by_aligned(inputs.aligned.folder, device) if opts.screen_utility else None
    return load_calibration(opts.utility_data, tokenizer, max_samples=FRONT_SAMPLES, screen=screen).samples


def _aligned_state(inputs: Inputs, plan: Plan) -> dict[str, torch.Tensor]:
    """A's weights for the probe model (F's skeleton), to measure A's own tune ASR."""
    aligned = inputs.readers["aligned"]
    return {t.name: aligned.get(t.name) for t in plan.tensors if t.name in aligned}


def _repair_into(opts: RepairOptions, method: Method, inputs: Inputs, plan: Plan, shards: ShardPlan,
                 device: torch.device, hessians: Hessians, digests: dict[Path, Future[str]],
                 started: float) -> dict[str, Any]:
    """Stream every tensor through the method into a temporary folder, then publish it as OUT.

    Input files are hashed for the report on background threads meanwhile (hashlib releases
    the GIL), one file per usable core, so provenance costs little extra wall time.
    """
    params, tuning, front = _tune(opts, method, inputs, plan, device, hessians)
    opts = dataclasses.replace(opts, params=params)
    modules: dict[str, dict[str, float]] = {}
    metadata = {"deltafix_version": __version__, "deltafix_method": method.name}
    stream = repaired_tensors(method, opts.params, inputs.readers, plan, device,
                              check_finite=not opts.allow_nonfinite, hessians=hessians, progress=opts.progress)
    with atomic_output(opts.out) as tmp:
        if opts.as_lora is not None:  # an adapter on A: no config.json, which would make OUT a full model
            extracted = extract_lora(stream, inputs.readers["aligned"], opts.as_lora,
                                     opts.recorded_refs.get("base", inputs.aligned.ref), device, tmp)
            report = _report(opts, inputs, plan, shards, extracted.modules, digests, started)
            report["output"] = extracted.output_entry(tmp)
            report["totals"]["lora_relative_error"] = extracted.relative_error
            say_what_the_adapter_left_out(extracted.not_in_adapter)
        else:
            with ShardedWriter(tmp, shards, metadata) as writer, contextlib.closing(stream):
                for spec, tensor, stats in stream:
                    writer.add(spec.name, tensor)
                    if stats is not None:
                        modules[spec.name] = stats
                writer.finish()
            assets = copy_assets([inputs.finetuned.folder, inputs.aligned.folder], tmp,
                                 weights_dtype=resolve_dtype(opts.dtype))
            report = _report(opts, inputs, plan, shards, modules, digests, started)
            report["output"].update(kind="full", **assets.report_entry())
        if hessians.safety is not None or hessians.sequential is not None:
            report["calibration"] = hessians.summary()
        if tuning is not None:
            report["autotune"] = tuning
        if front is not None:
            report["front"] = front
        _write_provenance(tmp, report, method, opts, inputs)
    return report


def _repair_adapter_into(opts: RepairOptions, method: Method, inputs: Inputs, plan: Plan, shards: ShardPlan,
                         device: torch.device, digests: dict[Path, Future[str]], started: float) -> dict[str, Any]:
    """Write the repaired fine-tune as a LoRA adapter of the same rank and config (``B ← M B``)."""
    finetuned = inputs.readers["finetuned"]
    assert isinstance(finetuned, AdapterCheckpoint)
    unaligned = inputs.readers["unaligned"]
    assert isinstance(unaligned, CheckpointReader)
    factors, modules = repair_adapter_factors(method, opts.params, finetuned.adapter, finetuned.base, unaligned,
                                              device, opts.progress, check_finite=not opts.allow_nonfinite)
    with atomic_output(opts.out) as tmp:
        finetuned.adapter.write(tmp, factors)
        assets = copy_assets([inputs.finetuned.folder], tmp)
        report = _report(opts, inputs, plan, shards, modules, digests, started)
        report["output"] = {"kind": "adapter", "files": sorted(p.name for p in tmp.iterdir()), **assets.report_entry()}
        _write_provenance(tmp, report, method, opts, inputs)
    return report


def _write_provenance(tmp: Path, report: dict[str, Any], method: Method, opts: RepairOptions,
                      inputs: Inputs) -> None:
    refs = {"base": inputs.aligned, "finetuned": inputs.finetuned, "unaligned": inputs.unaligned}
    recorded = {role: RecipeInput(ref=opts.recorded_refs.get(role, ref.ref), repo_id=ref.repo_id,
                                  revision=ref.revision, files=report["inputs"][INPUT_READERS[role]]["files"])
                for role, ref in refs.items() if ref is not None}
    run = RecipeRun(device=str(resolve_device(opts.device)), dtype=opts.dtype, out_shard_size=opts.shard_size,
                    utility_samples=opts.utility_samples, screen_utility=opts.screen_utility,
                    safety_template=opts.safety_template,
                    unaligned_kind=report["inputs"].get("unaligned", {}).get("kind"),
                    allow_nonfinite=opts.allow_nonfinite, allow_pickle=opts.allow_pickle, as_full=opts.as_full,
                    as_lora=opts.as_lora, front=opts.front)
    recipe = recipe_yaml(method.name, opts.params, inputs=recorded, data=inputs.data, run=run)
    write_provenance(tmp, report, recipe, inputs.finetuned.folder)


def _report(opts: RepairOptions, inputs: Inputs, plan: Plan, shards: ShardPlan,
            modules: dict[str, dict[str, float]], digests: dict[Path, Future[str]], started: float) -> dict[str, Any]:
    records = {"aligned": _input_record(inputs.aligned, inputs.readers["aligned"], digests),
               "finetuned": _input_record(inputs.finetuned, inputs.readers["finetuned"], digests)}
    if inputs.unaligned is not None:
        records["unaligned"] = _input_record(inputs.unaligned, inputs.readers["unaligned"], digests)
        records["unaligned"]["kind"] = opts.unaligned_kind or UNALIGNED_KINDS[0]
    before = sum(m["delta_norm_before"] ** 2 for m in modules.values()) ** 0.5
    after = sum(m["delta_norm_after"] ** 2 for m in modules.values()) ** 0.5
    return run_report(
        command=opts.command, method=opts.method, parameters=opts.params.model_dump(mode="json"), inputs=records,
        output={"shards": [shards.file_name(i) for i in range(len(shards.shards))], "total_size": shards.total_bytes},
        modules=modules, started=started,
        data={role: d.model_dump(exclude_none=True) for role, d in inputs.data.items()},
        notes=plan.notes,
        totals={"tensors": len(plan.tensors), "linear_modules": len(modules),
                "delta_norm_before": before, "delta_norm_after": after},
    )
