"""RESTA (Bhardwaj et al., ACL 2024): add the alignment direction back to every tensor.

``θ_R = θ_F + b (θ_A − θ_P)``; with DARE (Yu et al. 2024) on the fine-tune delta,
``θ_R = θ_A + DARE_p(δ) + b V`` where ``DARE_p(δ) = (1 − m) ⊙ δ / (1 − p)``, ``m ~ Bernoulli(p)``.
The DARE mask is drawn from a generator seeded by ``seed`` and the tensor name, so the output
does not depend on the order in which tensors are processed.
"""

from __future__ import annotations

import functools
import zlib
from typing import Annotated, Literal

import torch
from pydantic import Field

from deltafix import kernels
from deltafix.methods.registry import AutoTuneParams, FusedFn, Method, Repaired, TuneSpec, WeightTensors, register


class RestaParams(AutoTuneParams):
    scale: Annotated[float, Field(ge=0.0)] | Literal["auto"] = Field(
        0.5, description="b: weight of the alignment direction θ_A − θ_P (sweep 0.2–1); "
        "'auto' = the smallest b meeting target_asr on the tune prompts.")
    dare: float = Field(0.0, ge=0.0, lt=1.0, description="p: DARE drop rate on the fine-tune delta (0 = off).")
    seed: int = Field(0, description="seed of the DARE masks (per tensor: seed and tensor name).")


def dare(delta: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability ``p`` and rescale the survivors by ``1/(1−p)``."""
    if p == 0.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device="cpu").to(delta.device) >= p
    return torch.where(keep, delta / (1.0 - p), torch.zeros_like(delta))


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator whose stream depends only on ``seed`` and the tensor's name."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def resta(
    finetuned: torch.Tensor,
    aligned: torch.Tensor,
    unaligned: torch.Tensor,
    scale: float,
    dare_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RESTA on one tensor; all inputs the same shape, fp32.

    ``scale = 0`` without DARE returns ``finetuned`` itself: adding ``0 · V`` would turn ``-0.0``
    entries into ``+0.0``, and the no-op setting must reproduce F bit for bit. Without DARE,
    ``θ_F + b V`` is one fused multiply-add (``alpha``): one rounding, one pass over memory.
    """
    if dare_p == 0.0 and scale == 0.0:
        return finetuned
    alignment = aligned - unaligned
    if dare_p == 0.0:
        return torch.add(finetuned, alignment, alpha=scale, out=alignment)
    if generator is None:
        raise ValueError("DARE needs a generator")
    return aligned + dare(finetuned - aligned, dare_p, generator) + scale * alignment


def _repair(weight: WeightTensors, params: RestaParams, state: None) -> Repaired:
    assert weight.unaligned is not None
    gen = tensor_generator(params.seed, weight.name) if params.dare else None
    out = resta(weight.finetuned, weight.aligned, weight.unaligned, params.scale, params.dare, gen)
    return Repaired(out)


def _elementwise(params: RestaParams) -> bool:
    """DARE draws one mask per whole tensor, so only the plain merge may be streamed in pieces."""
    return params.dare == 0.0


def _fused(params: RestaParams) -> FusedFn | None:
    """The plain merge as one CPU pass (``kernels.resta_stream``): the same bits as ``resta``."""
    return functools.partial(kernels.resta_stream, scale=params.scale) if params.dare == 0.0 else None


register(
    Method(
        name="resta",
        summary="RESTA: θ_F + b(θ_A − θ_P) on every tensor, optional DARE on the fine-tune delta.",
        params=RestaParams,
        repair=_repair,
        needs_unaligned=True,
        elementwise=_elementwise,
        fused=_fused,
        tune=TuneSpec("scale", 0.05, 4.0, per_decade=6, safer="higher"),
    )
)
