"""``deltafix inspect``: what did the fine-tune change? Relative delta norm per tensor, by layer."""

from __future__ import annotations

import re
from typing import Any

import torch
from tqdm import tqdm

from deltafix.io.overlay import open_finetuned
from deltafix.io.pickled import open_checkpoint
from deltafix.io.refs import resolve_ref
from deltafix.engine.plan import build_plan


def _layer_key(name: str) -> tuple[int, str]:
    """Sort key: decoder layer number first (non-layer tensors last), then the name."""
    match = re.search(r"\.(\d+)\.", name)
    return (int(match.group(1)) if match else 1 << 30, name)


def inspect_delta(base: str, finetuned: str, *, allow_pickle: bool = False,
                  progress: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-tensor ‖δ‖ and ‖δ‖/‖W_A‖ (fp32), sorted by layer, plus the plan's validation notes.

    F is opened as ``repair`` opens it: a PEFT LoRA adapter folder counts as A with the adapter
    merged in, so the rows show the adapter's delta. Pickle weights only with ``allow_pickle``.
    """
    a = open_checkpoint(resolve_ref(base).folder, allow_pickle)
    f = open_finetuned(resolve_ref(finetuned).folder, a, allow_pickle)
    plan = build_plan(a, f)
    rows = []
    for spec in tqdm(plan.tensors, desc="inspect", unit="tensor", disable=None if progress else True):
        w_f = f.get(spec.name).float()
        w_a = a.get(spec.aligned_name).float()
        if spec.grown_rows:
            w_f = w_f[: -spec.grown_rows]
        delta = float(torch.linalg.vector_norm(w_f - w_a))
        norm = float(torch.linalg.vector_norm(w_a))
        rows.append({
            "name": spec.name,
            "shape": list(spec.shape),
            "linear": spec.is_linear,
            "delta_norm": delta,
            "relative_delta": delta / norm if norm else float("inf") if delta else 0.0,
            "finite": bool(torch.isfinite(w_f).all()),
        })
    rows.sort(key=lambda r: _layer_key(r["name"]))
    notes = list(plan.notes)
    notes += [f"{r['name']} contains NaN or Inf in the fine-tune" for r in rows if not r["finite"]]
    return rows, notes
