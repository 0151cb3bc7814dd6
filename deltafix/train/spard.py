"""LoRA fine-tuning of the aligned base on the user's data, with an optional safety term.

Three modes share one loop (DESIGN §6, §5.2):
- ``lora``: plain LoRA, cross-entropy on response tokens (the baseline);
- ``spard``: DPP-selected safety data (``dpp``) and, after every utility step, the SPAG correction
  (``spag``) on a safety batch; ``spag="code"`` instead does what the official code does whenever
  ℓ > τ + δ: rescale each gradient tensor (``spag.code_rescale``) and take an optimizer step;
- ``asft``: the loss gets ``λ Σ_l ‖(I − C_l) B_l A_l‖²_F`` (``asft``), which needs the unaligned P.
Multi-process runs go through accelerate (``accelerate launch``): the safety loss is averaged
over processes before the SPAG decision, so every process takes the same step.

Any mode can train on top of another adapter merged into the base in memory (``base_adapter``),
as the Buffer-and-Reinforce pipeline (``bufferlora``) does with its BufferLoRA.

The output is a PEFT adapter folder plus ``deltafix_train_report.json``, which records the options
and the sha256 of the files learned from (``input_hashes``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from deltafix import __version__
from deltafix.env import bar, progress_bars, resolve_device, resolve_dtype
from deltafix.errors import InputError, MismatchError, OptionError, OutputError, reason
from deltafix.io.writer import atomic_output
from deltafix.builtin_data import SAFETY_CALIBRATION
from deltafix.train.data import Record, collator, load_records, prepare_tokenizer, tokenize_records
from deltafix.options import (ASFT_TRAIN_LAM, DPP_BETA, DPP_P, DTYPE, DEVICE, EPOCHS, GRAD_ACCUM, LEARNING_RATE,
                              LORA_ALPHA, LORA_DROPOUT, LORA_R, LORA_TARGETS, LR_SCHEDULER, MAX_GRAD_NORM, SPAG_DELTA,
                              SPAG_TAU, SPAG_VARIANT, TRAIN_BATCH_SIZE, TRAIN_MAX_LENGTH, TRAIN_SEED, WARMUP_RATIO,
                              WARMUP_STEPS, WEIGHT_DECAY)
from deltafix.train.spag import ETA_SAFE, code_rescale, spag_correct

REPORT_NAME = "deltafix_train_report.json"


class LoraTraining(BaseModel):
    """The LoRA shape and optimisation settings every training run shares (and each pipeline stage)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(EPOCHS, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many utility steps")
    lr: float = Field(LEARNING_RATE, gt=0)
    batch_size: int = Field(TRAIN_BATCH_SIZE, ge=1)
    grad_accum: int = Field(GRAD_ACCUM, ge=1, description="batches per optimizer step (an epoch counts steps)")
    weight_decay: float = Field(WEIGHT_DECAY, ge=0, description="AdamW weight decay")
    lr_scheduler: Literal["constant", "linear", "cosine"] = LR_SCHEDULER
    warmup_ratio: float = Field(WARMUP_RATIO, ge=0, le=1, description="share of the steps warming lr up from 0")
    warmup_steps: int = Field(WARMUP_STEPS, ge=0, description="warm-up steps; above 0 it wins over warmup_ratio")
    max_grad_norm: float = Field(MAX_GRAD_NORM, ge=0, description="clip the gradient norm before each optimizer "
                                                                  "step; 0: no clipping")
    lora_r: int = Field(LORA_R, ge=1)
    lora_alpha: float = Field(LORA_ALPHA, gt=0)
    lora_dropout: float = Field(LORA_DROPOUT, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    seed: int = TRAIN_SEED
    device: str = DEVICE
    dtype: str = DTYPE
    max_length: int = Field(TRAIN_MAX_LENGTH, ge=2)

    def training(self) -> dict[str, Any]:
        """Just these shared settings, as keyword arguments for another options model."""
        return self.model_dump(include=set(LoraTraining.model_fields))


class TrainOptions(LoraTraining):
    """Every option of a training run; also written to the report, so the run can be repeated."""

    mode: Literal["lora", "spard", "asft"] = "spard"
    base: str
    data: Path
    extra_data: list[Path] = Field(default_factory=list,
                                   description="more JSONL files trained on together with data (e.g. benign records)")
    base_adapter: Path | None = Field(None, description="PEFT adapter merged into the base before training: the new "
                                                        "adapter learns on base + this one (e.g. a BufferLoRA)")
    out: Path
    safety_data: Path | None = Field(None, description="safety JSONL; None: the built-in calibration set")
    select: bool = Field(True, description="pick the safety subset with the DPP (spard)")
    p: float = Field(DPP_P, gt=0, le=1, description="DPP subset size k = ceil(p * |user data|)")
    beta: float = Field(DPP_BETA, ge=0, description="DPP relevance exponent")
    unaligned: str | None = Field(None, description="pre-alignment base P (asft)")
    safety_batch_size: int | None = Field(None, ge=1, description="safety examples per safety step (spard; one "
                                                                   "batch, whatever grad_accum); None: batch_size")
    tau: float = Field(SPAG_TAU, ge=0, description="SPAG safety-loss threshold")
    eta_safe: float = Field(ETA_SAFE, gt=0, description="SPAG largest step size (see spag); the code variant's "
                                                        "largest gradient factor α_max")
    spag: Literal["paper", "code"] = SPAG_VARIANT
    delta: float = Field(SPAG_DELTA, ge=0, description="margin of the code SPAG variant: step when loss > tau + delta")
    lam: float = Field(ASFT_TRAIN_LAM, ge=0, description="AsFT penalty weight")
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True)
class TrainResult:
    """Where the adapter was written, the report written next to it, and whether this process wrote them
    (in an ``accelerate launch`` run every process returns a result; only the main one should print)."""

    out: Path
    report: dict[str, Any]
    main_process: bool = True


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder; choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out} is not empty; pass --overwrite to replace it or choose another --out.")


def load_base(ref: str, dtype: str = "auto", adapter: Path | None = None):
    """The causal LM at ``ref`` (folder or Hub id) and its tokenizer, prepared for training.

    With ``adapter`` (a PEFT LoRA folder trained on ``ref``), the adapter is checked against the
    base's tensors and merged into the weights in memory, so the model returned is base + adapter.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltafix.io.refs import resolve_ref

    folder = resolve_ref(ref).folder
    if adapter is not None:
        check_base_adapter(folder, adapter)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype) or "auto",
                                                     use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load a causal LM with its tokenizer from {ref} (safetensors only): "
                         f"{reason(err)}.") from err
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model, prepare_tokenizer(tokenizer)


def check_base_adapter(base_folder: Path, adapter: Path) -> None:
    """Raise ``DeltafixError`` unless ``adapter`` is a PEFT adapter folder whose modules fit the base."""
    from deltafix.io.lora import LoraAdapter, is_adapter_folder
    from deltafix.io.reader import CheckpointReader

    if not is_adapter_folder(adapter):
        raise InputError(f"{adapter} has no adapter_config.json; pass a PEFT LoRA adapter folder.")
    base = CheckpointReader(base_folder)
    try:
        LoraAdapter.load(adapter, base=base)
    finally:
        base.close()


def input_hashes(opts: TrainOptions) -> dict[str, Any]:
    """sha256 of the files a run learns from (data files, the merged base adapter's weights): with the
    options, they identify the run, so a saved adapter can be recognised as this run's output. An
    ``hf:`` dataset is identified by the sha256 of its records as loaded."""
    from deltafix.io.datasets_source import describe_dataset, is_dataset_ref
    from deltafix.io.hashing import file_sha256, sha256_file
    from deltafix.io.lora import WEIGHTS_NAME

    def sha256(source: Path) -> str:
        shown = str(source)
        return describe_dataset(shown, "training data").sha256 if is_dataset_ref(shown) else sha256_file(source)

    data = [opts.data, *opts.extra_data] + ([opts.safety_data] if opts.safety_data else [])
    return {
        "data": {str(path): sha256(Path(path)) for path in data},
        "base_adapter": file_sha256(opts.base_adapter / WEIGHTS_NAME) if opts.base_adapter else None,
    }


def _batches(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Endless stream of batches, reshuffled every pass."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _safety_records(opts: TrainOptions, model, tokenizer, user: list[Record], accelerator) -> tuple[list[Record], int]:
    """The safety records to train on and the size of the pool they came from."""
    from accelerate.utils import broadcast_object_list

    from deltafix.train.dpp import select_subset

    pool = load_records(opts.safety_data or SAFETY_CALIBRATION)
    if not opts.select:
        return pool, len(pool)
    picked: list[Any] = [None]
    if accelerator.is_main_process:
        model.to(accelerator.device)
        picked[0] = select_subset(model, tokenizer, [r.prompt_text for r in pool], [r.prompt_text for r in user],
                                  opts.p, opts.beta, batch_size=opts.batch_size, progress=opts.progress)
    broadcast_object_list(picked)
    return [pool[i] for i in picked[0]], len(pool)


def _lora_model(model, opts: TrainOptions):
    from peft import LoraConfig, get_peft_model
    from peft.utils.error import NoMatchingPeftModuleError

    config = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, target_modules=opts.target_modules,
                        lora_dropout=opts.lora_dropout, bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except NoMatchingPeftModuleError as err:
        raise MismatchError(f"none of the target modules {opts.target_modules} exists in {opts.base}; "
                            "set --target-modules to its Linear names.") from err


def _loader(features: list[dict[str, list[int]]], tokenizer, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(features, batch_size=batch_size, shuffle=True, collate_fn=collator(tokenizer),
                      generator=torch.Generator().manual_seed(seed))


def lr_schedule(optimizer: torch.optim.Optimizer, opts: LoraTraining, steps: int):
    """The learning-rate schedule over ``steps`` optimizer steps: a linear warm-up from 0 (``warmup_steps``,
    else ``ceil(warmup_ratio · steps)``, as transformers' ``TrainingArguments`` counts it), then constant,
    linear or cosine decay to 0."""
    from transformers import get_scheduler

    warmup = opts.warmup_steps or math.ceil(opts.warmup_ratio * steps)
    name = "constant_with_warmup" if opts.lr_scheduler == "constant" else opts.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def accumulate(model, batches: Iterator[dict[str, torch.Tensor]], count: int, accelerator) -> torch.Tensor:
    """The mean loss of ``count`` batches, detached, with its gradient accumulated into ``.grad``: each
    batch's backward is scaled by 1/count."""
    total = torch.zeros(())
    for _ in range(count):
        loss = model(**next(batches)).loss
        accelerator.backward(loss / count)
        total = total.to(loss.device) + loss.detach() / count
    return total


def _clip(accelerator, params: list[torch.nn.Parameter], max_norm: float) -> None:
    if max_norm > 0:
        accelerator.clip_grad_norm_(params, max_norm)


def safety_step(opts: TrainOptions, ell: float, trainable: list[torch.nn.Parameter], optimizer,
                 accelerator) -> float:
    """SPARD's safety correction from the safety gradient in ``.grad``; returns its size (0: none fired).

    paper: the SPAG step, whose size is min((ℓ − τ)/‖g‖², η_safe). code: when ℓ > τ + δ, the
    official code's clip, per-tensor rescale and optimizer step; the size is the largest factor.
    """
    if opts.spag == "paper":
        return spag_correct(trainable, ell, opts.tau, opts.eta_safe)
    if ell <= opts.tau + opts.delta:
        return 0.0
    _clip(accelerator, trainable, opts.max_grad_norm)
    factors = code_rescale([p.grad for p in trainable if p.grad is not None], ell, opts.tau, opts.eta_safe)
    optimizer.step()
    return max(factors)


def train_adapter(opts: TrainOptions) -> TrainResult:
    """Run one training job (``opts.mode``) and write the adapter and report into ``opts.out``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from deltafix.io.reader import CheckpointReader
    from deltafix.io.refs import resolve_ref
    from deltafix.train.asft import asft_regulariser, asft_terms

    if opts.mode == "asft" and not opts.unaligned:
        raise OptionError("asft training needs --unaligned, the pre-alignment base P of --base.")
    _check_output(opts.out, opts.overwrite)
    accelerator = Accelerator(cpu=resolve_device(opts.device).type == "cpu")
    set_seed(opts.seed)
    started = time.perf_counter()

    model, tokenizer = load_base(opts.base, opts.dtype, opts.base_adapter)
    user = [record for path in (opts.data, *opts.extra_data) for record in load_records(path)]
    safety, pool_size = ([], 0)
    if opts.mode == "spard":
        safety, pool_size = _safety_records(opts, model, tokenizer, user, accelerator)
    model = _lora_model(model, opts)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=opts.lr, weight_decay=opts.weight_decay)
    user_loader = _loader(tokenize_records(tokenizer, user, opts.max_length), tokenizer, opts.batch_size, opts.seed)
    loaders = [user_loader]
    if safety:
        loaders.append(_loader(tokenize_records(tokenizer, safety, opts.max_length), tokenizer,
                               opts.safety_batch_size or opts.batch_size, opts.seed + 1))
    model, optimizer, *loaders = accelerator.prepare(model, optimizer, *loaders)
    terms = []
    if opts.mode == "asft":
        terms = asft_terms(accelerator.unwrap_model(model), CheckpointReader(resolve_ref(opts.unaligned).folder))

    steps = opts.max_steps or opts.epochs * math.ceil(len(loaders[0]) / opts.grad_accum)
    scheduler = lr_schedule(optimizer, opts, steps)
    user_batches = _batches(loaders[0])
    safety_batches = _batches(loaders[1]) if safety else None
    losses: list[float] = []
    penalties: list[float] = []
    safety_losses: list[float] = []
    fired: list[int] = []
    step_sizes: list[float] = []

    with progress_bars(opts.progress and accelerator.is_main_process):
        step_bar = bar(range(steps), desc=opts.mode, unit="step")
        for step in step_bar:
            model.train()
            loss = accumulate(model, user_batches, opts.grad_accum, accelerator)
            if terms:  # the AsFT penalty depends on the weights alone: once per optimizer step
                penalty = asft_regulariser(terms)
                accelerator.backward(opts.lam * penalty)
                penalties.append(accelerator.reduce(penalty.detach(), "mean").item())
            _clip(accelerator, trainable, opts.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(accelerator.reduce(loss, "mean").item())
            if safety_batches is not None:
                ell = accelerator.reduce(accumulate(model, safety_batches, 1, accelerator), "mean").item()
                safety_losses.append(ell)
                size = safety_step(opts, ell, trainable, optimizer, accelerator)
                optimizer.zero_grad(set_to_none=True)
                if size > 0:
                    fired.append(step)
                    step_sizes.append(size)
            scheduler.step()  # after the pair, as the official SPARD trainer: its safety step takes the user step's lr
            if isinstance(step_bar, tqdm):
                step_bar.set_postfix(loss=f"{losses[-1]:.3f}", fired=len(fired))

    report = {
        "deltafix_version": __version__,
        "mode": opts.mode,
        "options": opts.model_dump(mode="json"),
        "inputs": input_hashes(opts),
        "steps": steps,
        "num_processes": accelerator.num_processes,
        "user_examples": len(user),
        "safety_pool": pool_size,
        "safety_examples": len(safety),
        "losses": losses,
        "safety_losses": safety_losses,
        "asft_penalties": penalties,
        "corrections_fired": len(fired),
        "correction_steps": fired,
        "correction_sizes": step_sizes,
        "seconds": time.perf_counter() - started,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _publish(accelerator.unwrap_model(model), report, opts.out)
    accelerator.wait_for_everyone()
    return TrainResult(opts.out, report, accelerator.is_main_process)


def _publish(model, report: dict[str, Any], out: Path) -> None:
    """Write adapter and report into a staging folder that replaces ``out`` in one rename."""
    with atomic_output(out) as tmp:
        model.save_pretrained(tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")

