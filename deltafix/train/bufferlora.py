"""Buffer-and-Reinforce (DESIGN §5.5, §6): a user LoRA that keeps A's safety, in four resumable stages.

Each stage writes one folder under OUT:

- ``buffer``: the BufferLoRA, plain LoRA on A trained on harmful compliance data (``--harmful``);
- ``reinforce``: the ReinforceLoRA, plain LoRA on refusals (``--reinforce-data``, default the
  built-in safety set) mixed with benign answers (``--benign``, default the built-in benign training
  set) so that they are ``benign_share`` of the set (``mix``; the paper's code: half), trained on
  **A + buffer**; the mixed set is written to ``OUT/reinforce_data.jsonl``;
- ``user``: the UserLoRA, plain cross-entropy on the user's data, also trained on **A + buffer**;
- ``merged``: the buffer is dropped and UserLoRA and ReinforceLoRA are QR-merged onto **A**
  (``deltafix.engine.merge_lora.run_merge_lora``): ``W = W_A + c (ΔU + ΔR⊥)``, a full checkpoint or, with
  ``as_adapter``, the exact adapter.

Why the buffer is merged while training and dropped afterwards: with the harmful direction already
in the weights, a user fine-tune gains nothing by moving that way, so UserLoRA learns the task while
the buffer "absorbs" the harmful drift that fine-tuning otherwise causes. ReinforceLoRA is trained
against the same A + buffer, so it learns to refuse even with that direction present. Deploying
without the buffer leaves A + the user update + the reinforce update (minus ``alpha`` of its
component in the user update's column space, so it does not undo the task). The buffer is merged
into the weights in memory (``merge_and_unload``, via ``TrainOptions.base_adapter``); it is never
part of the output.

The buffer and reinforce stages depend only on A and their data: train them once per base and
pass them to later runs for other users (``buffer``, ``reinforce``). A given ReinforceLoRA needs the
buffer it was trained with, so ``reinforce`` requires ``buffer``.

Resuming: every stage publishes its folder atomically with a report of how it was made (the
training options and the sha256 of the data and base adapter it learned from, or the merge
parameters and the sha256 of the adapters merged). A rerun reuses a stage folder whose report
matches what this run would do, so an interrupted run continues where it stopped; a folder made
differently is an error unless ``overwrite``, which redoes it. Changes propagate: a retrained
buffer changes the hash the later stages recorded, so they are redone too. The base is identified
by its ref, not rehashed. The three trainings share the LoRA settings; their seeds are
``seed``, ``seed + 1`` and ``seed + 2``, so the adapters do not start from the same ``A`` factors.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from deltafix import __version__
from deltafix.errors import OptionError, OutputError
from deltafix.io.hashing import file_sha256
from deltafix.io.lora import CONFIG_NAME, WEIGHTS_NAME
from deltafix.io.writer import atomic_file
from deltafix.engine.report import REPORT_NAME as MERGE_REPORT
from deltafix.methods.qr_merge import ALPHA, SCALE
from deltafix.options import (BENIGN_SHARE, BUFFERLORA_LORA_DROPOUT, BUFFERLORA_LR_SCHEDULER, BUFFERLORA_WARMUP_RATIO,
                              OUT_SHARD_BYTES)
from deltafix.builtin_data import BENIGN_TRAIN, SAFETY_CALIBRATION
from deltafix.train.data import load_records, records_jsonl
from deltafix.train.mix import mix_with_benign
from deltafix.train.spard import (REPORT_NAME, LoraTraining, TrainOptions, check_base_adapter, input_hashes,
                                  train_adapter)

SEED_OFFSET = {"buffer": 0, "reinforce": 1, "user": 2}
# Options that change how a run is shown or whether it may replace output, not what it produces.
PRESENTATION_OPTIONS = {"progress", "overwrite"}
REINFORCE_DATA = "reinforce_data.jsonl"


class BufferLoraOptions(LoraTraining):
    """Every option of a Buffer-and-Reinforce run; the LoRA settings apply to all three trainings.

    Defaults follow DESIGN §6: r = 32, alpha = 64 on q, v, gate, up, down; the schedule and dropout
    are the official scripts' (``options.BUFFERLORA_LR_SCHEDULER``: without them the pipeline over-refuses).
    """

    lr_scheduler: Literal["constant", "linear", "cosine"] = BUFFERLORA_LR_SCHEDULER
    warmup_ratio: float = Field(BUFFERLORA_WARMUP_RATIO, ge=0, le=1, description="share of the steps warming lr up "
                                                                                 "from 0")
    lora_dropout: float = Field(BUFFERLORA_LORA_DROPOUT, ge=0, lt=1)

    base: str
    data: Path = Field(description="the user's training data, JSONL")
    out: Path
    harmful: Path | None = Field(None, description="harmful compliance data for the BufferLoRA (unless buffer)")
    buffer: Path | None = Field(None, description="a BufferLoRA trained earlier on this base: skip stage buffer")
    reinforce: Path | None = Field(None, description="a ReinforceLoRA trained earlier on base + buffer: skip "
                                                     "stage reinforce")
    reinforce_data: Path | None = Field(None, description="refusals for the ReinforceLoRA; None: built-in set")
    benign: Path | None = Field(None, description="benign data trained on with the refusals; None: built-in set")
    benign_share: float = Field(BENIGN_SHARE, gt=0, lt=1, description="share of benign records in the "
                                                                    "ReinforceLoRA's training set")
    as_adapter: bool = Field(False, description="write the merged result as an adapter, not a full checkpoint")
    alpha: float = Field(ALPHA, ge=0, le=1, description="share of ΔR's component in the user column space removed")
    scale: float = Field(SCALE, ge=0, description="c in W = W_A + c (ΔU + ΔR⊥)")
    shard_size: int = Field(OUT_SHARD_BYTES, gt=0, description="largest output shard in bytes (full output)")
    overwrite: bool = False
    progress: bool = True
    command: str = ""


@dataclass(frozen=True)
class StageResult:
    """What happened to one stage in this run, where its output is, and the seconds this run spent on it."""

    name: str
    status: Literal["trained", "merged", "reused", "given"]
    path: Path
    seconds: float

    @property
    def skipped(self) -> bool:
        return self.status in ("reused", "given")


def run_bufferlora(opts: BufferLoraOptions) -> dict[str, Any]:
    """Run (or resume) the four stages into ``opts.out``; write and return the pipeline report."""
    from deltafix.io.refs import resolve_ref

    started = time.perf_counter()
    opts = _absolute(opts)
    _check_options(opts)
    base_folder = resolve_ref(opts.base).folder
    for given in (opts.buffer, opts.reinforce):
        if given is not None:
            check_base_adapter(base_folder, given)
    for path in _data_files(opts):
        load_records(path)
    if opts.out.exists() and not opts.out.is_dir():
        raise OutputError(f"{opts.out} exists and is not a folder; choose another --out.")

    stages: list[StageResult] = []
    if opts.buffer is not None:
        stages.append(StageResult("buffer", "given", opts.buffer, 0.0))
    else:
        stages.append(_train_stage(_stage_options(opts, "buffer", opts.harmful, [], None)))
    buffer = stages[-1].path
    if opts.reinforce is not None:
        stages.append(StageResult("reinforce", "given", opts.reinforce, 0.0))
    else:
        stages.append(_train_stage(_stage_options(opts, "reinforce", _reinforce_data(opts), [], buffer)))
    reinforce = stages[-1].path
    stages.append(_train_stage(_stage_options(opts, "user", opts.data, [], buffer)))
    stages.append(_merge_stage(opts, stages[-1].path, reinforce))

    report = {
        "deltafix_version": __version__,
        "command": opts.command,
        "pipeline": "bufferlora",
        "options": opts.model_dump(mode="json", exclude=PRESENTATION_OPTIONS),
        "stages": {s.name: {"status": s.status, "path": str(s.path), "seconds": s.seconds} for s in stages},
        "skipped": [s.name for s in stages if s.skipped],
        "output": {"path": str(stages[-1].path), "kind": "adapter" if opts.as_adapter else "full"},
        "total_seconds": time.perf_counter() - started,
    }
    _write_json(opts.out / REPORT_NAME, report)
    return report


def _absolute(opts: BufferLoraOptions) -> BufferLoraOptions:
    """The same options with every local path absolute, so a rerun from another folder matches."""
    paths = {name: Path(value).expanduser().resolve() for name, value in opts
             if isinstance(value, Path)}
    base = Path(opts.base).expanduser()
    if base.exists():
        paths["base"] = str(base.resolve())
    return opts.model_copy(update=paths)


def _check_options(opts: BufferLoraOptions) -> None:
    if opts.buffer is None and opts.harmful is None:
        raise OptionError("the BufferLoRA needs harmful compliance data: pass --harmful FILE, or --buffer DIR "
                          "with a BufferLoRA trained earlier.")
    if opts.reinforce is not None and opts.buffer is None:
        raise OptionError("--reinforce needs --buffer, the BufferLoRA that ReinforceLoRA was trained with.")


def _data_files(opts: BufferLoraOptions) -> list[Path]:
    """Every JSONL file a stage of this run may train on."""
    files = [opts.data]
    if opts.buffer is None:
        files.append(opts.harmful)
    if opts.reinforce is None:
        files += [opts.reinforce_data or SAFETY_CALIBRATION, opts.benign or BENIGN_TRAIN]
    return files


def _reinforce_data(opts: BufferLoraOptions) -> Path:
    """Write the ReinforceLoRA's mixed training set (``mix``) to ``OUT/reinforce_data.jsonl``: the same
    inputs give the same bytes, so the stage's recorded hash still matches on a rerun."""
    mixed = mix_with_benign(load_records(opts.reinforce_data or SAFETY_CALIBRATION),
                            load_records(opts.benign or BENIGN_TRAIN), opts.benign_share,
                            opts.seed + SEED_OFFSET["reinforce"])
    path = opts.out / REINFORCE_DATA
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_file(path, records_jsonl(mixed).encode())
    return path


def _stage_options(opts: BufferLoraOptions, stage: str, data: Path, extra: list[Path],
                   base_adapter: Path | None) -> TrainOptions:
    settings = {**opts.training(), "seed": opts.seed + SEED_OFFSET[stage]}
    return TrainOptions(mode="lora", base=opts.base, data=data, extra_data=extra, base_adapter=base_adapter,
                        out=opts.out / stage, overwrite=opts.overwrite, progress=opts.progress, **settings)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """The file is whole or absent (``atomic_file``): a stage's marker must never be half written."""
    atomic_file(path, (json.dumps(value, indent=2) + "\n").encode())


def _stale(folder: Path, overwrite: bool) -> None:
    """A stage folder that exists but was not made by this run's inputs: refuse, or let it be replaced."""
    if folder.exists() and not overwrite:
        raise OutputError(f"{folder} holds a stage made from other options or data (or an incomplete one); pass "
                          "--overwrite to redo it, or choose another --out.")


def trained_matches(opts: TrainOptions) -> bool:
    """Whether ``opts.out`` already holds the adapter this training run would write."""
    report = _read_json(opts.out / REPORT_NAME)
    if report is None or not all((opts.out / name).is_file() for name in (CONFIG_NAME, WEIGHTS_NAME)):
        return False
    wanted = opts.model_dump(mode="json", exclude=PRESENTATION_OPTIONS)
    saved = {k: v for k, v in report.get("options", {}).items() if k not in PRESENTATION_OPTIONS}
    return saved == wanted and report.get("inputs") == input_hashes(opts)


def _train_stage(opts: TrainOptions) -> StageResult:
    name = opts.out.name
    started = time.perf_counter()
    if trained_matches(opts):
        return StageResult(name, "reused", opts.out, time.perf_counter() - started)
    _stale(opts.out, opts.overwrite)
    train_adapter(opts)
    return StageResult(name, "trained", opts.out, time.perf_counter() - started)


def _merge_inputs(opts: BufferLoraOptions, user: Path, reinforce: Path) -> dict[str, Any]:
    """What a merge report records about its inputs, reduced to what identifies them."""
    return {"base": opts.base, "parameters": {"alpha": opts.alpha, "scale": opts.scale},
            "kind": "adapter" if opts.as_adapter else "full",
            "user": {WEIGHTS_NAME: file_sha256(user / WEIGHTS_NAME)},
            "reinforce": {WEIGHTS_NAME: file_sha256(reinforce / WEIGHTS_NAME)}}


def _merged_identity(report: dict[str, Any]) -> dict[str, Any]:
    inputs = report.get("inputs", {})
    return {"base": inputs.get("aligned", {}).get("ref"), "parameters": report.get("parameters"),
            "kind": report.get("output", {}).get("kind"),
            "user": inputs.get("finetuned", {}).get("files"),
            "reinforce": inputs.get("reinforce", {}).get("files")}


def _merge_stage(opts: BufferLoraOptions, user: Path, reinforce: Path) -> StageResult:
    from deltafix.engine.merge_lora import MergeOptions, run_merge_lora

    out = opts.out / "merged"
    started = time.perf_counter()
    report = _read_json(out / MERGE_REPORT)
    if report is not None and _merged_identity(report) == _merge_inputs(opts, user, reinforce):
        return StageResult("merged", "reused", out, time.perf_counter() - started)
    _stale(out, opts.overwrite)
    run_merge_lora(MergeOptions(base=opts.base, user=str(user), reinforce=str(reinforce), out=out, alpha=opts.alpha,
                                scale=opts.scale, as_adapter=opts.as_adapter, shard_size=opts.shard_size,
                                overwrite=opts.overwrite, command=opts.command, progress=opts.progress))
    return StageResult("merged", "merged", out, time.perf_counter() - started)

