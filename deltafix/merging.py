"""``deltafix merge-lora``: QR-merge a user LoRA and a ReinforceLoRA onto A, streamed into OUT.

The math is in ``lora_merge``; this module resolves the inputs, streams A's shards through
``merged_tensor`` into the sharded writer (or writes the exact merged adapter), and publishes
OUT atomically with a report and a model card, like ``repair``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from deltafix import __version__
from deltafix.card import write_model_card
from deltafix.errors import InputError
from deltafix.io.assets import copy_assets
from deltafix.io.hashing import file_sha256
from deltafix.io.lora import LoraAdapter, is_adapter_folder
from deltafix.io.reader import CheckpointReader
from deltafix.io.refs import resolve_ref
from deltafix.io.writer import ShardedWriter, ShardPlan, TensorSpec, atomic_output, check_output_location
from deltafix.lora_merge import ALPHA, SCALE, check_mergeable, merge_adapters, merged_tensor

REPORT_NAME = "deltafix_report.json"


@dataclass
class MergeOptions:
    base: str
    user: str
    reinforce: str
    out: Path
    alpha: float = ALPHA
    scale: float = SCALE
    as_adapter: bool = False
    shard_size: int = 5 * 10**9
    overwrite: bool = False
    command: str = ""
    progress: bool = True


def _adapter(ref: str, role: str, base: CheckpointReader) -> tuple[LoraAdapter, Path]:
    folder = resolve_ref(ref).folder
    if not is_adapter_folder(folder):
        raise InputError(f"the {role} adapter {ref} has no adapter_config.json; pass a PEFT LoRA adapter folder.")
    return LoraAdapter.load(folder, base=base), folder


def run_merge_lora(opts: MergeOptions) -> dict[str, Any]:
    """Validate the three inputs, write the merged checkpoint (or adapter) into OUT, return the report."""
    started = time.perf_counter()
    base_ref = resolve_ref(opts.base)
    base = CheckpointReader(base_ref.folder)
    user, user_folder = _adapter(opts.user, "user", base)
    reinforce, reinforce_folder = _adapter(opts.reinforce, "reinforce", base)
    check_mergeable(user, reinforce)
    check_output_location(opts.out, [base_ref.folder, user_folder, reinforce_folder], opts.overwrite)
    with atomic_output(opts.out) as tmp:
        if opts.as_adapter:
            merge_adapters(user, reinforce, opts.alpha, opts.scale).write(tmp)
            copy_assets([user_folder], tmp)
        else:
            specs = [TensorSpec(n, base.info(n).shape, base.info(n).dtype) for n in base.names]
            with ShardedWriter(tmp, ShardPlan.build(specs, opts.shard_size),
                               {"deltafix_version": __version__, "deltafix_method": "qr-merge"}) as writer:
                for spec in tqdm(specs, desc="merge-lora", unit="tensor", disable=None if opts.progress else True):
                    value = merged_tensor(spec.name, base.get(spec.name), user, reinforce, opts.alpha, opts.scale)
                    writer.add(spec.name, value.to(spec.dtype))
                writer.finish()
            copy_assets([user_folder, base_ref.folder], tmp)
        report = {
            "deltafix_version": __version__,
            "command": opts.command,
            "method": "qr-merge",
            "parameters": {"alpha": opts.alpha, "scale": opts.scale},
            "inputs": {
                "aligned": {"ref": opts.base, "repo_id": base_ref.repo_id, "revision": base_ref.revision,
                            "files": {f.name: file_sha256(f) for f in base.files}},
                "finetuned": {"ref": opts.user, "repo_id": None, "revision": None,
                              "files": {user.weights_file.name: file_sha256(user.weights_file)}},
                "reinforce": {"ref": opts.reinforce, "repo_id": None, "revision": None,
                              "files": {reinforce.weights_file.name: file_sha256(reinforce.weights_file)}},
            },
            "output": {"kind": "adapter" if opts.as_adapter else "full"},
            "modules": {name: {"user": name in user.modules, "reinforce": name in reinforce.modules}
                        for name in sorted(set(user.modules) | set(reinforce.modules))},
            "timings": {"total_seconds": time.perf_counter() - started},
        }
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        write_model_card(tmp, report)
    base.close()
    return report
