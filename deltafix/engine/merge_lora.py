"""``deltafix merge-lora``: QR-merge a user LoRA and a ReinforceLoRA onto A, streamed into OUT.

The math is in ``lora_merge``; this module resolves the inputs, streams A's shards through
``merged_tensor`` into the sharded writer (or writes the exact merged adapter), and publishes
OUT atomically with a report, the effective recipe and a model card, like ``repair``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError
from tqdm import tqdm

from deltafix import __version__
from deltafix.options import OUT_SHARD_BYTES, load_recipe, recipe_yaml
from deltafix.errors import InputError, OptionError
from deltafix.io.assets import copy_assets
from deltafix.io.hashing import file_sha256
from deltafix.io.lora import LoraAdapter, is_adapter_folder
from deltafix.io.pickled import open_checkpoint
from deltafix.io.reader import CheckpointReader
from deltafix.io.refs import resolve_ref
from deltafix.io.staging import remove_stale
from deltafix.io.writer import ShardedWriter, ShardPlan, TensorSpec, atomic_output, check_output_location
from deltafix.methods.qr_merge import ALPHA, SCALE, check_mergeable, merge_adapters, merged_tensor
from deltafix.methods import MethodParams
from deltafix.engine.report import input_record, run_report, write_provenance
from deltafix.engine.stream import check_output, nonfinite_input
from deltafix.methods.stats import all_finite

MERGE_METHOD = "qr-merge"
"""The ``method`` of a merge's report and recipe; ``deltafix repair`` has no method of that name."""


class QrMergeParams(MethodParams):
    """The QR merge's parameters: the keys of its recipe and of its report's ``parameters``."""

    alpha: float = Field(ALPHA, ge=0.0, le=1.0, description="share of ΔR's component in U's column space removed")
    scale: float = Field(SCALE, ge=0.0, description="c in W = W_A + c(ΔU + ΔR⊥)")


def merge_params(recipe: Path | None, overrides: dict[str, float]) -> QrMergeParams:
    """alpha and scale: the recipe's (an earlier merge's ``deltafix_recipe.yaml``), then ``overrides``."""
    values: dict[str, Any] = {}
    if recipe is not None:
        loaded = load_recipe(recipe)
        if loaded.method != MERGE_METHOD:
            raise OptionError(f"recipe {recipe} is for method {loaded.method}, which deltafix repair runs; "
                              f"merge-lora takes a {MERGE_METHOD} recipe.")
        values = loaded.parameters
    try:
        return QrMergeParams.model_validate({**values, **overrides})
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            raise OptionError(f"recipe {recipe}: unknown parameter {key!r} (merge-lora takes alpha and scale).") \
                from err
        where = f"--{key}" if key in overrides else f"recipe {recipe}: {key}"
        raise OptionError(f"{where}: {first['msg']}, not {first['input']!r}.") from err


@dataclass
class MergeOptions:
    base: str
    user: str
    reinforce: str
    out: Path
    alpha: float = ALPHA
    scale: float = SCALE
    as_adapter: bool = False
    shard_size: int = OUT_SHARD_BYTES
    overwrite: bool = False
    allow_pickle: bool = False
    command: str = ""
    progress: bool = True


def _adapter(ref: str, role: str, base: CheckpointReader, allow_pickle: bool) -> tuple[LoraAdapter, Path]:
    folder = resolve_ref(ref).folder
    if not is_adapter_folder(folder):
        raise InputError(f"the {role} adapter {ref} has no adapter_config.json; pass a PEFT LoRA adapter folder.")
    return LoraAdapter.load(folder, base=base, allow_pickle=allow_pickle), folder


def _check_options(opts: MergeOptions) -> None:
    """``--alpha`` in [0, 1] and ``--scale`` >= 0, both finite: a NaN passes a range check."""
    if not (math.isfinite(opts.alpha) and 0.0 <= opts.alpha <= 1.0):
        raise OptionError(f"--alpha takes a finite number >= 0 and <= 1, not {opts.alpha}.")
    if not (math.isfinite(opts.scale) and opts.scale >= 0.0):
        raise OptionError(f"--scale takes a finite number >= 0, not {opts.scale}.")


def _check_adapter_finite(adapter: LoraAdapter, role: str) -> None:
    """Refuse NaN/Inf in an adapter's factors and saved full tensors before anything is merged."""
    tensors = [(f"{module.path} (LoRA A/B)", t) for module in adapter.modules.values() for t in (module.A, module.B)]
    tensors += [(name, adapter.replacement(name)) for name in adapter.replaced]
    for name, tensor in tensors:
        if not all_finite(tensor):
            raise InputError(f"the {role} adapter {adapter.folder}: tensor {name!r} contains NaN or Inf; "
                             "fix or re-train that adapter.")


def _merged(name: str, base: CheckpointReader, user: LoraAdapter, reinforce: LoraAdapter, opts: MergeOptions,
            dtype: torch.dtype) -> torch.Tensor:
    """One output tensor, checked: every input reaches it, so one finite check covers A's tensor too
    (the adapters were checked whole); a NaN from finite inputs is a ``NonFiniteOutputError``."""
    base_tensor = base.get(name)
    value = merged_tensor(name, base_tensor, user, reinforce, opts.alpha, opts.scale).to(dtype)
    if not all_finite(value):
        if not all_finite(base_tensor):
            raise nonfinite_input(name, "aligned")
        check_output(name, value)
    return value


def run_merge_lora(opts: MergeOptions) -> dict[str, Any]:
    """Validate the three inputs, write the merged checkpoint (or adapter) into OUT, return the report."""
    started = time.perf_counter()
    _check_options(opts)
    base_ref = resolve_ref(opts.base)
    base = open_checkpoint(base_ref.folder, opts.allow_pickle)
    user, user_folder = _adapter(opts.user, "user", base, opts.allow_pickle)
    reinforce, reinforce_folder = _adapter(opts.reinforce, "reinforce", base, opts.allow_pickle)
    check_mergeable(user, reinforce)
    _check_adapter_finite(user, "user")
    _check_adapter_finite(reinforce, "reinforce")
    check_output_location(opts.out, [base_ref.folder, user_folder, reinforce_folder], opts.overwrite)
    remove_stale(opts.out)
    with atomic_output(opts.out) as tmp:
        if opts.as_adapter:
            merge_adapters(user, reinforce, opts.alpha, opts.scale).write(tmp)
            assets = copy_assets([user_folder], tmp)
        else:
            specs = [TensorSpec(n, base.info(n).shape, base.info(n).dtype) for n in base.names]
            with ShardedWriter(tmp, ShardPlan.build(specs, opts.shard_size),
                               {"deltafix_version": __version__, "deltafix_method": MERGE_METHOD}) as writer:
                for spec in tqdm(specs, desc="merge-lora", unit="tensor", disable=None if opts.progress else True):
                    writer.add(spec.name, _merged(spec.name, base, user, reinforce, opts, spec.dtype))
                writer.finish()
            assets = copy_assets([user_folder, base_ref.folder], tmp)
        inputs = {
            "aligned": input_record(opts.base, base_ref.repo_id, base_ref.revision,
                                    {f.name: file_sha256(f) for f in base.files}),
            "finetuned": input_record(opts.user, None, None, {user.weights_file.name: file_sha256(user.weights_file)}),
            "reinforce": input_record(opts.reinforce, None, None,
                                      {reinforce.weights_file.name: file_sha256(reinforce.weights_file)}),
        }
        report = run_report(
            command=opts.command, method=MERGE_METHOD, parameters={"alpha": opts.alpha, "scale": opts.scale},
            inputs=inputs, output={"kind": "adapter" if opts.as_adapter else "full", **assets.report_entry()},
            modules={name: {"user": name in user.modules, "reinforce": name in reinforce.modules}
                     for name in sorted(set(user.modules) | set(reinforce.modules))},
            started=started,
        )
        write_provenance(tmp, report, recipe_yaml(MERGE_METHOD, QrMergeParams(alpha=opts.alpha, scale=opts.scale)),
                         user_folder)
    base.close()
    return report
