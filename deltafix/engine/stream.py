"""The tensor stream of a repair: inputs read one weight at a time, the method applied, the result
handed on in the output dtype. Writing to disk and in-memory auto-tuning both consume it.

Most methods see each weight whole, in fp32 on the compute device. Elementwise methods (RESTA
without DARE) are streamed instead in pieces of ``CPU_PIECE`` elements, converted straight from
memory-mapped input files into reused buffers: converting three bf16 inputs to fp32, combining
them and converting back touches main memory about ten times per element when done on whole
tensors, and every fresh multi-MB allocation page-faults on first touch. A 1 MB piece stays in
cache through the whole chain. Faster still, a method's fused CPU kernel (``Method.fused``; RESTA
has one) takes a worker's whole window of the mapped inputs in one pass, which is what lets a
streaming repair cost about as much as a plain copy (DESIGN §7). The result is bit-identical
every way.
"""

from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from deltafix.env import usable_cores
from deltafix.errors import InputError
from deltafix.io.reader import CheckpointReader, TensorIndex
from deltafix.methods import Method, MethodParams, Repaired, WeightTensors
from deltafix.methods.registry import FusedFn
from deltafix.methods.stats import all_finite, delta_norms
from deltafix.engine.plan import Plan, PlannedTensor

if TYPE_CHECKING:
    from deltafix.calibration.cache import HessianStore
    from deltafix.engine.grams import Hessians

Stats = dict[str, float]

CPU_PIECE = 1 << 18
"""Elements per piece on CPU: 1 MB of fp32 per input (2^16 to 2^18 measured alike, 2^20 slower)."""
DEVICE_PIECE = 1 << 24
"""Elements per piece on an accelerator, where kernel launches, not cache, set the piece size."""
MAX_WINDOW_PIECES = 64
"""Most pieces in one worker job (16 M elements on CPU). A weight is split into one job per worker
or more, so the workers share it evenly; each job maps its window of every input once. Fewer,
larger windows mean fewer unmaps, each of which interrupts every core running this process (a
TLB shootdown, dear on a VM); the cap bounds the mapped input pages counted in RSS."""
MAX_PIECE_WORKERS = 4
"""Beyond a few threads the pieces are bound by memory bandwidth, not cores."""



class NonFiniteOutputError(RuntimeError):
    """A repaired tensor holds NaN/Inf although its inputs were finite and the parameters validated:
    a deltafix bug or a float overflow, never a result to publish. Not a ``DeltafixError``, so the
    CLI reports it as an internal error, and raised before OUT is published."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the repaired tensor {name!r} came out with NaN or Inf from finite inputs; "
                         "nothing was published")


def nonfinite_input(name: str, role: str = "finetuned") -> InputError:
    """The refusal of an input tensor holding NaN/Inf; ``--allow-nonfinite`` covers only F's."""
    if role == "finetuned":
        return InputError(f"the fine-tune's tensor {name!r} contains NaN or Inf; fix it or pass --allow-nonfinite.")
    model = {"aligned": "aligned model", "unaligned": "unaligned model"}.get(role, role)
    return InputError(f"the {model}'s tensor {name!r} contains NaN or Inf; fix or re-download that checkpoint "
                      "(--allow-nonfinite covers the fine-tune only).")


def check_output(name: str, tensor: torch.Tensor, reduced: float | None = None) -> None:
    """Raise ``NonFiniteOutputError`` unless ``tensor`` (a repaired output) is finite; ``reduced`` as
    in ``all_finite``, e.g. ``‖R − A‖²`` computed on ``tensor``'s exact values."""
    if not all_finite(tensor, reduced):
        raise NonFiniteOutputError(name)


def _rounded_reduction(out: torch.Tensor, after: float) -> float | None:
    """``after`` (``‖R − A‖²`` on R in fp32) as the finite check of ``out``, R rounded to its dtype,
    where that holds: for fp32 it is R itself, and a bf16 rounding that overflows needs R − A above
    2^119 (half an ulp at bf16's top), whose square already overflows fp32. fp16 overflows at
    65520, so its outputs are checked elementwise (None)."""
    return None if out.dtype == torch.float16 else after


def _load(reader: TensorIndex, name: str, device: torch.device) -> torch.Tensor:
    return reader.get(name).to(device=device, dtype=torch.float32)


def _on_device(source: HessianStore | None, spec: PlannedTensor,
               device: torch.device) -> Callable[[], torch.Tensor] | None:
    if source is None or not spec.is_linear:
        return None
    return lambda: source.get(spec.name).to(device=device, dtype=torch.float32)


def _weights(readers: dict[str, TensorIndex], plan: Plan, device: torch.device, check_finite: bool,
             hessians: Hessians | None = None) -> Iterator[tuple[PlannedTensor, WeightTensors, torch.Tensor | None]]:
    """Yield each planned tensor as fp32 method inputs (A-shaped) plus F's extra vocabulary rows.

    Every input is checked for NaN/Inf as it is loaded, before a method can turn it into a
    misleading failure (a NaN Hessian solve says "increase damp"); ``check_finite`` governs F's
    check only, which ``--allow-nonfinite`` turns off.
    """
    safety = hessians.safety if hessians is not None else None
    utility = hessians.utility if hessians is not None else None
    a, f = readers["aligned"], readers["finetuned"]
    p = readers.get("unaligned")
    for spec in plan.tensors:
        finetuned = _load(f, spec.name, device)
        if check_finite and not all_finite(finetuned):
            raise nonfinite_input(spec.name)
        aligned = _load(a, spec.aligned_name, device)
        if not all_finite(aligned):
            raise nonfinite_input(spec.aligned_name, "aligned")
        unaligned = _load(p, spec.unaligned_name, device) if p is not None and spec.unaligned_name else None
        if unaligned is not None and not all_finite(unaligned):
            raise nonfinite_input(spec.unaligned_name, "unaligned")
        grown = finetuned[-spec.grown_rows:] if spec.grown_rows else None
        if spec.grown_rows:
            finetuned = finetuned[: -spec.grown_rows]
        yield spec, WeightTensors(
            name=spec.name,
            aligned=aligned,
            finetuned=finetuned,
            unaligned=unaligned,
            is_linear=spec.is_linear,
            hessian=_on_device(safety, spec, device),
            utility_hessian=_on_device(utility, spec, device),
        ), grown


def _module_stats(weight: WeightTensors, repaired: Repaired) -> Stats:
    stats = delta_norms(weight.aligned, weight.finetuned, repaired.tensor)
    stats.update({k: float(v) for k, v in repaired.stats.items()})
    return stats


class _PieceBuffers:
    """One worker's reused fp32 buffers, one per input: where each piece is converted to."""

    def __init__(self, roles: Iterable[str], piece: int, device: torch.device) -> None:
        self.fp32 = {role: torch.empty(piece, device=device) for role in roles}

    def load(self, role: str, source: torch.Tensor) -> torch.Tensor:
        return self.fp32[role][:source.numel()].copy_(source)


class PieceStream:
    """Streams weights through an elementwise method in pieces (see module doc).

    A weight is cut into windows of whole pieces, each a job for the worker threads
    (torch releases the GIL): a job maps its window of every input file, converts piece by piece
    into the worker's own fp32 buffers and writes the result into the weight's output tensor, the
    only allocation per weight. ``start`` queues a weight and returns at once, so the workers
    compute the next weight while the caller writes the previous one to disk.
    """

    def __init__(self, readers: dict[str, CheckpointReader], device: torch.device, pool: ThreadPoolExecutor,
                 workers: int) -> None:
        self.readers = readers
        self.device = device
        self.piece = CPU_PIECE if device.type == "cpu" else DEVICE_PIECE
        self.pool = pool
        self.workers = workers
        self._local = threading.local()

    def start(self, method: Method, params: MethodParams, spec: PlannedTensor,
              check_finite: bool) -> Callable[[], tuple[torch.Tensor, Stats | None]]:
        """Queue one weight; the returned call waits for it and gives the repaired tensor (CPU,
        output dtype) and, for decoder Linears, its delta norms."""
        out = torch.empty(spec.shape, dtype=spec.dtype)
        flat = out.view(-1)
        n_jobs = max(self.workers, -(-flat.numel() // (self.piece * MAX_WINDOW_PIECES)))
        window = -(-flat.numel() // (n_jobs * self.piece)) * self.piece or self.piece
        fused = method.fused(params) if method.fused is not None and self.device.type == "cpu" else None
        jobs = [self.pool.submit(self._window, start, min(start + window, flat.numel()), flat, method, params, spec,
                                 check_finite, fused) for start in range(0, flat.numel(), window)]

        def result() -> tuple[torch.Tensor, Stats | None]:
            norms = [job.result() for job in jobs]
            if not spec.is_linear:
                return out, None
            return out, {"delta_norm_before": math.sqrt(sum(b for b, _ in norms)),
                         "delta_norm_after": math.sqrt(sum(a for _, a in norms))}
        return result

    def _buffers(self) -> _PieceBuffers:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = _PieceBuffers(self.readers, self.piece, self.device)
        return buffers

    def _window(self, start: int, stop: int, flat: torch.Tensor, method: Method, params: MethodParams,
                spec: PlannedTensor, check_finite: bool, fused: FusedFn | None) -> tuple[float, float]:
        """Repair elements ``start .. stop`` into ``flat``; squared delta norms before/after.

        The finite checks ride on the two norms each stretch yields anyway (``_check_stretch``).
        The method's fused kernel, when it takes these inputs, does the whole window in one pass;
        else it goes piece by piece.
        """
        kept = min(stop, self.readers["aligned"].info(spec.aligned_name).numel)
        names = {"aligned": spec.aligned_name,
                 "unaligned": spec.unaligned_name if "unaligned" in self.readers else None}
        finetuned = self.readers["finetuned"].mapped(spec.name, start, stop - start)
        inputs = {role: self.readers[role].mapped(name, start, kept - start)
                  for role, name in names.items() if name and kept > start}
        if fused is not None and kept > start:
            norms = fused(finetuned[:kept - start], inputs["aligned"], inputs.get("unaligned"), flat[start:kept])
            if norms is not None:
                _check_stretch(spec, check_finite, norms, finetuned[:kept - start], inputs, flat[start:kept],
                               _rounded_reduction(flat, norms[1]))
                grown = finetuned[kept - start:]  # F's extra vocabulary rows, copied as they are
                if check_finite and not all_finite(grown):
                    raise nonfinite_input(spec.name)
                flat[kept:stop].copy_(grown)
                return norms
        return self._pieces(start, stop, kept, flat, finetuned, inputs, method, params, spec, check_finite)

    def _pieces(self, start: int, stop: int, kept: int, flat: torch.Tensor, finetuned: torch.Tensor,
                inputs: dict[str, torch.Tensor], method: Method, params: MethodParams, spec: PlannedTensor,
                check_finite: bool) -> tuple[float, float]:
        """``_window`` through ``method.repair``, one piece at a time in the worker's fp32 buffers."""
        buf = self._buffers()
        before = after = 0.0
        for lo in range(start, stop, self.piece):
            hi = min(lo + self.piece, stop)
            f = buf.load("finetuned", finetuned[lo - start:hi - start])
            n_kept = max(0, min(hi, kept) - lo)  # beyond: F's extra vocabulary rows, copied as they are
            if n_kept:
                loaded = {role: buf.load(role, inputs[role][lo - start:lo - start + n_kept]) for role in inputs}
                weight = WeightTensors(name=spec.name, aligned=loaded["aligned"], finetuned=f[:n_kept],
                                       unaligned=loaded.get("unaligned"), is_linear=spec.is_linear)
                moved = torch.dist(weight.finetuned, weight.aligned).item() ** 2
                result = method.repair(weight, params, None).tensor
                changed = torch.dist(result, weight.aligned).item() ** 2
                out = flat[lo:lo + n_kept]
                out.copy_(result)
                _check_stretch(spec, check_finite, (moved, changed), weight.finetuned, loaded, out,
                               changed if out.dtype == torch.float32 else None)
                if spec.is_linear:
                    before += moved
                    after += changed
            if check_finite and not all_finite(f[n_kept:]):
                raise nonfinite_input(spec.name)
            flat[lo + n_kept:hi].copy_(f[n_kept:])
        return before, after


def _check_stretch(spec: PlannedTensor, check_finite: bool, norms: tuple[float, float], finetuned: torch.Tensor,
                   inputs: dict[str, torch.Tensor], out: torch.Tensor, out_reduced: float | None) -> None:
    """NaN/Inf checks of one stretch of a weight, from ``(‖F − A‖², ‖R − A‖²)`` on it.

    NaN and Inf propagate into the norms, so an elementwise check runs only when one is not
    finite (or overflowed): ``‖F − A‖`` covers F and A, ``‖R − A‖`` covers P (through R) and R.
    ``out`` is R as written, ``out_reduced`` a reduction that covers it exactly, if any. P is not
    looked at where the method does not read it (RESTA at scale 0 returns F).
    """
    before, after = norms
    if not math.isfinite(before):
        if check_finite and not all_finite(finetuned):
            raise nonfinite_input(spec.name)
        if not all_finite(inputs["aligned"]):
            raise nonfinite_input(spec.aligned_name, "aligned")
    if not math.isfinite(after) and "unaligned" in inputs and not all_finite(inputs["unaligned"]):
        raise nonfinite_input(spec.unaligned_name or spec.name, "unaligned")
    if check_finite:
        check_output(spec.name, out, out_reduced)


def _piece_stream(method: Method, params: MethodParams, readers: dict[str, CheckpointReader], plan: Plan,
                  device: torch.device, check_finite: bool, bar: dict[str, Any]
                  ) -> Iterator[tuple[PlannedTensor, torch.Tensor, Stats | None]]:
    """``repaired_tensors`` for elementwise methods: one weight in flight on the workers while the
    caller consumes the one before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a piece is too small to split: threads work on separate windows instead
    workers = piece_workers() if device.type == "cpu" else 1
    pool = ThreadPoolExecutor(workers, thread_name_prefix="deltafix-piece")
    try:
        pieces = PieceStream(readers, device, pool, workers)
        specs = iter(plan.tensors)

        def start_next() -> list[tuple[PlannedTensor, Callable[[], tuple[torch.Tensor, Stats | None]]]]:
            return [(spec, pieces.start(method, params, spec, check_finite)) for spec in itertools.islice(specs, 1)]

        progress = tqdm(**bar)
        ahead = start_next()
        while ahead:
            ahead += start_next()  # the workers compute the next weight while this one is consumed
            spec, result = ahead.pop(0)
            yield spec, *result()
            progress.update()
        progress.close()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def piece_workers() -> int:
    """Threads for piece streaming: the usable cores, at most ``MAX_PIECE_WORKERS``."""
    return max(1, min(MAX_PIECE_WORKERS, usable_cores()))


def streams_in_pieces(method: Method, params: MethodParams, readers: dict[str, TensorIndex]) -> bool:
    """Elementwise for these params, and every input a plain checkpoint (an adapter overlay
    materialises each merged weight anyway)."""
    return (method.elementwise is not None and method.elementwise(params)
            and all(isinstance(r, CheckpointReader) for r in readers.values()))


def repaired_tensors(method: Method, params: MethodParams, readers: dict[str, TensorIndex], plan: Plan,
                     device: torch.device, *, check_finite: bool = True, hessians: Hessians | None = None,
                     progress: bool = False) -> Iterator[tuple[PlannedTensor, torch.Tensor, Stats | None]]:
    """The method applied to every planned tensor, in plan order: ``(spec, CPU tensor in the
    output dtype, per-module stats for decoder Linears else None)``."""
    bar = dict(total=len(plan.tensors), desc=f"repair ({method.name})", unit="tensor",
               disable=None if progress else True)
    if streams_in_pieces(method, params, readers):
        yield from _piece_stream(method, params, readers, plan, device, check_finite, bar)  # type: ignore[arg-type]
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
            tensor = tensor.to(device="cpu", dtype=spec.dtype)
            if check_finite:  # a linear's ‖R − A‖ covers the fp32 R (F's grown rows were checked as F)
                exact = stats is not None and spec.dtype == torch.float32
                check_output(spec.name, tensor, stats["delta_norm_after"] if exact else None)
            yield spec, tensor, stats
    finally:
        if sequential is not None:
            state.close()
