"""The tensor stream of a repair: inputs read one weight at a time, the method applied, the result
handed on in the output dtype. Writing to disk and in-memory auto-tuning both consume it.

Most methods see each weight whole, in fp32 on the compute device. Elementwise methods (RESTA
without DARE) are streamed instead in pieces of ``CPU_PIECE`` elements through reused buffers:
converting three bf16 inputs to fp32, combining them and converting back touches main memory about
ten times per element when done on whole tensors, and every fresh multi-MB allocation page-faults
on first touch. A 1 MB piece stays in cache through the whole chain, which is what lets a streaming
repair cost about as much as a plain copy (DESIGN §7). The result is bit-identical either way.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Union

import torch
from tqdm import tqdm

from deltafix.errors import InputError
from deltafix.io.overlay import AdapterCheckpoint
from deltafix.io.reader import CheckpointReader
from deltafix.methods import Method, MethodParams, Repaired, WeightTensors
from deltafix.methods.stats import delta_norms
from deltafix.plan import Plan, PlannedTensor

if TYPE_CHECKING:
    from deltafix.hcache import HessianStore
    from deltafix.hessian_inputs import Hessians

Reader = Union[CheckpointReader, AdapterCheckpoint]
Stats = dict[str, float]

CPU_PIECE = 1 << 18
"""Elements per piece on CPU: 1 MB of fp32 per input, measured fastest (2^16 and 2^20 were slower)."""
DEVICE_PIECE = 1 << 24
"""Elements per piece on an accelerator, where kernel launches, not cache, set the piece size."""
MAX_PIECE_WORKERS = 4
"""Beyond a few threads the pieces are bound by memory bandwidth, not cores."""


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/Inf: one fast reduction (NaN and Inf propagate into a sum); the exact elementwise
    check runs only when the sum is not finite, which a legitimate overflow could also cause."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _nonfinite(name: str) -> InputError:
    return InputError(f"the fine-tune's tensor {name!r} contains NaN or Inf; fix it or pass --allow-nonfinite.")


def _load(reader: Reader, name: str, device: torch.device) -> torch.Tensor:
    return reader.get(name).to(device=device, dtype=torch.float32)


def _on_device(source: HessianStore | None, spec: PlannedTensor,
               device: torch.device) -> Callable[[], torch.Tensor] | None:
    if source is None or not spec.is_linear:
        return None
    return lambda: source.get(spec.name).to(device=device, dtype=torch.float32)


def _weights(readers: dict[str, Reader], plan: Plan, device: torch.device, check_finite: bool,
             hessians: Hessians | None = None) -> Iterator[tuple[PlannedTensor, WeightTensors, torch.Tensor | None]]:
    """Yield each planned tensor as fp32 method inputs (A-shaped) plus F's extra vocabulary rows."""
    safety = hessians.safety if hessians is not None else None
    utility = hessians.utility if hessians is not None else None
    a, f = readers["aligned"], readers["finetuned"]
    p = readers.get("unaligned")
    for spec in plan.tensors:
        finetuned = _load(f, spec.name, device)
        if check_finite and not all_finite(finetuned):
            raise _nonfinite(spec.name)
        grown = finetuned[-spec.grown_rows:] if spec.grown_rows else None
        if spec.grown_rows:
            finetuned = finetuned[: -spec.grown_rows]
        yield spec, WeightTensors(
            name=spec.name,
            aligned=_load(a, spec.aligned_name, device),
            finetuned=finetuned,
            unaligned=_load(p, spec.unaligned_name, device) if p is not None and spec.unaligned_name else None,
            is_linear=spec.is_linear,
            hessian=_on_device(safety, spec, device),
            utility_hessian=_on_device(utility, spec, device),
        ), grown


def _module_stats(weight: WeightTensors, repaired: Repaired) -> Stats:
    stats = delta_norms(weight.aligned, weight.finetuned, repaired.tensor)
    stats.update({k: float(v) for k, v in repaired.stats.items()})
    return stats


class _PieceBuffers:
    """One worker's reused buffers: a raw one per (input, stored dtype), an fp32 one per input."""

    def __init__(self, roles: Iterable[str], piece: int, device: torch.device) -> None:
        self.piece = piece
        self.raw: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.fp32 = {role: torch.empty(piece, device=device) for role in roles}
        self.diff = torch.empty(piece, device=device)

    def read(self, reader: CheckpointReader, role: str, name: str, start: int, n: int) -> torch.Tensor:
        dtype = reader.info(name).dtype
        raw = self.raw.get((role, dtype))
        if raw is None:
            raw = self.raw[role, dtype] = torch.empty(self.piece, dtype=dtype)
        return self.fp32[role][:n].copy_(reader.read_flat(name, start, raw[:n]))

    def sq_norm(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return torch.linalg.vector_norm(torch.sub(x, y, out=self.diff[:x.numel()])).item() ** 2


class PieceStream:
    """Streams one weight at a time through an elementwise method in pieces (see module doc).

    Each weight's pieces are split into contiguous spans, one per worker thread (torch and the
    reads release the GIL); every worker reuses its own buffers, so only the output tensor is
    allocated per weight.
    """

    def __init__(self, readers: dict[str, CheckpointReader], device: torch.device, pool: ThreadPoolExecutor,
                 workers: int) -> None:
        self.readers = readers
        self.piece = CPU_PIECE if device.type == "cpu" else DEVICE_PIECE
        self.pool = pool
        self.buffers = [_PieceBuffers(readers, self.piece, device) for _ in range(workers)]

    def repair(self, method: Method, params: MethodParams, spec: PlannedTensor,
               check_finite: bool) -> tuple[torch.Tensor, Stats | None]:
        """The repaired tensor (CPU, output dtype) and, for decoder Linears, its delta norms."""
        out = torch.empty(spec.shape, dtype=spec.dtype)
        starts = list(range(0, out.numel(), self.piece))
        per_worker = -(-len(starts) // len(self.buffers)) or 1
        spans = [starts[i:i + per_worker] for i in range(0, len(starts), per_worker)]
        jobs = [self.pool.submit(self._span, buffers, span, out.view(-1), method, params, spec, check_finite)
                for buffers, span in zip(self.buffers, spans)]
        norms = [job.result() for job in jobs]
        if not spec.is_linear:
            return out, None
        return out, {"delta_norm_before": math.sqrt(sum(b for b, _ in norms)),
                     "delta_norm_after": math.sqrt(sum(a for _, a in norms))}

    def _span(self, buf: _PieceBuffers, starts: list[int], flat: torch.Tensor, method: Method,
              params: MethodParams, spec: PlannedTensor, check_finite: bool) -> tuple[float, float]:
        """Repair the pieces at ``starts`` into ``flat``; squared delta norms before/after."""
        kept = self.readers["aligned"].info(spec.aligned_name).numel
        unaligned = spec.unaligned_name if "unaligned" in self.readers else None
        before = after = 0.0
        for start in starts:
            n = min(self.piece, flat.numel() - start)
            finetuned = buf.read(self.readers["finetuned"], "finetuned", spec.name, start, n)
            if check_finite and not all_finite(finetuned):
                raise _nonfinite(spec.name)
            if start >= kept:  # F's extra vocabulary rows: copied as they are
                flat[start:start + n].copy_(finetuned)
                continue
            n_kept = min(n, kept - start)
            weight = WeightTensors(
                name=spec.name,
                aligned=buf.read(self.readers["aligned"], "aligned", spec.aligned_name, start, n_kept),
                finetuned=finetuned[:n_kept],
                unaligned=(buf.read(self.readers["unaligned"], "unaligned", unaligned, start, n_kept)
                           if unaligned else None),
                is_linear=spec.is_linear,
            )
            result = method.repair(weight, params, None).tensor
            if spec.is_linear:
                before += buf.sq_norm(weight.finetuned, weight.aligned)
                after += buf.sq_norm(result, weight.aligned)
            flat[start:start + n_kept].copy_(result)
            flat[start + n_kept:start + n].copy_(finetuned[n_kept:])
        return before, after


def piece_workers() -> int:
    """Threads for piece streaming: the usable cores, at most ``MAX_PIECE_WORKERS``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_PIECE_WORKERS, cores))


def piece_buffer_bytes(n_inputs: int) -> int:
    """Host bytes of every worker's piece buffers: raw (at most 4 bytes) + fp32 per input, one diff."""
    return piece_workers() * CPU_PIECE * (8 * n_inputs + 4)


def streams_in_pieces(method: Method, params: MethodParams, readers: dict[str, Reader]) -> bool:
    """Elementwise for these params, and every input a plain checkpoint (an adapter overlay
    materialises each merged weight anyway)."""
    return (method.elementwise is not None and method.elementwise(params)
            and all(isinstance(r, CheckpointReader) for r in readers.values()))


def repaired_tensors(method: Method, params: MethodParams, readers: dict[str, Reader], plan: Plan,
                     device: torch.device, *, check_finite: bool = True, hessians: Hessians | None = None,
                     progress: bool = False) -> Iterator[tuple[PlannedTensor, torch.Tensor, Stats | None]]:
    """The method applied to every planned tensor, in plan order: ``(spec, CPU tensor in the
    output dtype, per-module stats for decoder Linears else None)``."""
    bar = dict(total=len(plan.tensors), desc=f"repair ({method.name})", unit="tensor",
               disable=None if progress else True)
    if streams_in_pieces(method, params, readers):
        workers = piece_workers() if device.type == "cpu" else 1
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a piece is too small to split: threads work on separate pieces instead
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="deltafix-piece") as pool:
                pieces = PieceStream(readers, device, pool, workers)  # type: ignore[arg-type]
                for spec in tqdm(plan.tensors, **bar):
                    yield spec, *pieces.repair(method, params, spec, check_finite)
        finally:
            torch.set_num_threads(threads)
        return
    state = None
    if method.survey is not None:
        state = method.survey((w for _, w, _ in _weights(readers, plan, device, False, hessians)), params)
    sequential = hessians.sequential if hessians is not None else None
    if sequential is not None:
        assert method.sequential is not None and state is None
        solver = method.sequential
        state = sequential.solve(lambda w_a, w_f, grams: solver.solve(w_a, w_f, grams, params), solver.keep(params))
    try:
        for spec, weight, grown in tqdm(_weights(readers, plan, device, check_finite, hessians), **bar):
            repaired = method.repair(weight, params, state)
            tensor = repaired.tensor if grown is None else torch.cat([repaired.tensor, grown])
            stats = _module_stats(weight, repaired) if spec.is_linear else None
            yield spec, tensor.to(device="cpu", dtype=spec.dtype), stats
    finally:
        if sequential is not None:
            state.close()
