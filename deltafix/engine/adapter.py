"""Repair a LoRA adapter as an adapter: ``B ← M B`` per module, A and the scaling unchanged.

For methods whose edit is a left multiplication of the delta (AsFT's operator, Safe LoRA's
projection), ``M (s B A) = s (M B) A``, so the repaired fine-tune is again a LoRA adapter of the
same rank and config, loadable with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from tqdm import tqdm

from deltafix.errors import OptionError
from deltafix.io.lora import LoraAdapter, LoraModule
from deltafix.io.reader import CheckpointReader
from deltafix.methods import Method, MethodParams, WeightTensors
from deltafix.methods.stats import delta_norms
from deltafix.engine.plan import is_decoder_linear
from deltafix.engine.stream import check_output, nonfinite_input
from deltafix.methods.stats import all_finite


def _module_weights(adapter: LoraAdapter, aligned: CheckpointReader, unaligned: CheckpointReader,
                    device: torch.device, check_finite: bool) -> Iterator[tuple[str, LoraModule, WeightTensors]]:
    """Each adapted module as fp32 tensors in ``nn.Linear`` layout (out, in) on ``device``, every
    input checked for NaN/Inf as it is loaded (the adapter's factors only with ``check_finite``)."""
    for name, module in adapter.modules.items():
        w_a = aligned.get(name).to(device=device, dtype=torch.float32)
        if not all_finite(w_a):
            raise nonfinite_input(name, "aligned")
        w_p = unaligned.get(name).to(device=device, dtype=torch.float32)
        if not all_finite(w_p):
            raise nonfinite_input(name, "unaligned")
        if check_finite and not (all_finite(module.A) and all_finite(module.B)):
            raise nonfinite_input(f"{module.path} (LoRA A/B)")
        delta = module.delta().to(device)
        if module.fan_in_fan_out:
            w_a, w_p, delta = w_a.T, w_p.T, delta.T
        weight = WeightTensors(name=name, aligned=w_a, finetuned=w_a + delta, unaligned=w_p,
                               is_linear=is_decoder_linear(name, tuple(w_a.shape)))
        yield name, module, weight


def repair_adapter_factors(method: Method, params: MethodParams, adapter: LoraAdapter, aligned: CheckpointReader,
                           unaligned: CheckpointReader, device: torch.device, progress: bool = False,
                           check_finite: bool = True
                           ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, dict[str, float]]]:
    """New ``(A, B)`` per module and per-module stats; B keeps its stored dtype.

    ``check_finite`` (off with ``--allow-nonfinite``) refuses NaN/Inf in the adapter's factors
    and, with finite inputs, a new B that is not finite (``NonFiniteOutputError``).
    """
    if method.lora_b is None:
        raise OptionError(f"method {method.name} does not keep low rank; its output is a full checkpoint.")
    state: Any = None
    if method.survey is not None:
        state = method.survey((w for _, _, w in _module_weights(adapter, aligned, unaligned, device, check_finite)),
                              params)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    stats: dict[str, dict[str, float]] = {}
    steps = tqdm(_module_weights(adapter, aligned, unaligned, device, check_finite), total=len(adapter.modules),
                 desc=f"repair adapter ({method.name})", unit="module", disable=None if progress else True)
    for name, module, weight in steps:
        b = module.B.to(device=device, dtype=torch.float32)
        if weight.is_linear:
            new_b = method.lora_b(weight, b, params, state)
        else:
            new_b = _kept_or_dropped(method, params, state, weight, b)
        repaired = weight.aligned + module.scaling * (new_b @ module.A.to(device=device, dtype=torch.float32))
        stats[name] = delta_norms(weight.aligned, weight.finetuned, repaired)
        factors[name] = (module.A, new_b.to(device="cpu", dtype=module.B.dtype))
        if check_finite:
            check_output(f"{module.path} (LoRA B)", factors[name][1])
    return factors, stats


def _kept_or_dropped(method: Method, params: MethodParams, state: Any, weight: WeightTensors,
                     b: torch.Tensor) -> torch.Tensor:
    """Modules outside decoder Linears follow the method's dense policy: keep F (B) or revert to A (0)."""
    dense = method.repair(weight, params, state).tensor
    if torch.equal(dense, weight.finetuned):
        return b
    if torch.equal(dense, weight.aligned):
        return torch.zeros_like(b)
    raise OptionError(f"{method.name} changes adapter module {weight.name} in a way an adapter cannot hold; "
                      "pass --as-full for a merged checkpoint.")
