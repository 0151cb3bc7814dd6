"""``repair --as-lora RANK``: the repaired model as a PEFT LoRA adapter on A.

A full repaired checkpoint is as large as the model; many users serve fine-tunes as adapters on a
shared base. So the repaired delta ``δ = W_R − W_A`` of each decoder Linear is truncated to rank
``RANK`` by SVD (``deltafix.methods.lowrank``, as mergekit extracts a LoRA from a full fine-tune)
and written as a plain LoRA with scaling 1, loadable with ``PeftModel.from_pretrained(A, OUT)``.
What a rank-r adapter loses is reported per module (``lora_relative_error``, ‖δ − B A‖_F / ‖δ‖_F)
and in total, so the user can pick a rank. Tensors outside decoder Linears (norms, embeddings,
the LM head) that the repair left different from A cannot be held by a plain LoRA: they are
listed in the report (``output.not_in_adapter``) and the adapter leaves them at A's values.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from deltafix.engine.plan import PlannedTensor
from deltafix.errors import OptionError
from deltafix.io.lora import unit_scaling_config, write_adapter
from deltafix.io.reader import TensorIndex
from deltafix.methods.lowrank import low_rank_factors

Stats = dict[str, float]


def check_rank(rank: int | None, as_full: bool) -> None:
    """Refuse a rank below 1, and ``--as-full`` with it (two outputs asked for), before any work."""
    if rank is None:
        return
    if rank < 1:
        raise OptionError(f"--as-lora takes a rank of at least 1, not {rank}.")
    if as_full:
        raise OptionError("--as-full asks for a full checkpoint, --as-lora for an adapter; pass one of them.")


@dataclass
class Extracted:
    """What ``extract_lora`` wrote: per-Linear numbers and the tensors the adapter could not hold."""

    rank: int
    modules: dict[str, Stats] = field(default_factory=dict)
    not_in_adapter: list[str] = field(default_factory=list)
    lost_sq: float = 0.0
    delta_sq: float = 0.0

    @property
    def relative_error(self) -> float:
        """‖δ − B A‖_F / ‖δ‖_F over all Linears together (0 when the repair changed none)."""
        return (self.lost_sq / self.delta_sq) ** 0.5 if self.delta_sq > 0 else 0.0

    def output_entry(self, folder: Path) -> dict[str, Any]:
        """The report's ``output``: what kind, the rank, the files, and what was left at A."""
        return {"kind": "lora", "rank": self.rank, "files": sorted(p.name for p in folder.iterdir()),
                "not_in_adapter": list(self.not_in_adapter)}


def extract_lora(stream: Iterator[tuple[PlannedTensor, torch.Tensor, Stats | None]], aligned: TensorIndex,
                 rank: int, base_ref: str, device: torch.device, folder: Path) -> Extracted:
    """Consume the repair's tensor stream and write the rank-``rank`` adapter into ``folder``.

    ``δ`` is taken from the repaired tensor as the full output would store it (the output dtype,
    upcast to fp32) minus A's, so the adapter approximates exactly what ``R`` would hold. The
    factors are written in that dtype too; ``base_model_name_or_path`` is A as the user named it.
    """
    result = Extracted(rank)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    with contextlib.closing(stream):
        for spec, tensor, stats in stream:
            w_a = aligned.get(spec.aligned_name)
            if not spec.is_linear:
                if tensor.shape != w_a.shape or not torch.equal(tensor, w_a.to(tensor.dtype)):
                    result.not_in_adapter.append(spec.name)
                continue
            delta = tensor.to(device=device, dtype=torch.float32) - w_a.to(device=device, dtype=torch.float32)
            A, B, error = low_rank_factors(delta, rank)
            norm_sq = float(torch.linalg.matrix_norm(delta)) ** 2
            result.delta_sq += norm_sq
            result.lost_sq += error ** 2 * norm_sq
            factors[spec.name] = (A.to(device="cpu", dtype=spec.dtype), B.to(device="cpu", dtype=spec.dtype))
            ranks[spec.name.removesuffix(".weight")] = A.shape[0]
            result.modules[spec.name] = {**(stats or {}), "lora_rank": A.shape[0], "lora_relative_error": error}
    if not factors:
        raise OptionError("--as-lora writes the decoder Linear weights as LoRA factors, and this model has none "
                          "that deltafix recognises; drop --as-lora for a full checkpoint.")
    template = {"base_model_name_or_path": base_ref, "task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0,
                "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None}
    write_adapter(folder, unit_scaling_config(template, ranks), factors)
    return result


def say_what_the_adapter_left_out(names: list[str]) -> None:
    """One stderr line when the repair changed tensors a plain LoRA cannot hold (stdout stays clean)."""
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        print(f"deltafix: --as-lora left {len(names)} tensor(s) outside decoder Linears at A's values ({shown}); "
              "they are listed in the report's output.not_in_adapter, and a full checkpoint keeps them.",
              file=sys.stderr)
