"""Hot paths on CUDA: the torch reference against the CUDA extension, and torch's projection apply.

Per hot path and shape: the torch reference's time, the kernel's time, the speedup, and the
achieved memory bandwidth (the least bytes the operation must move, over its time) as a share of
the device's peak. Peak bandwidth comes from a table of known devices, else from a measured large
device-to-device copy. Rows:

- ``select``: ``select_block`` on the first column block (W_F and W fp32, as in the pipeline).
- ``compensate``: ``compensate_block`` on that block (also GFLOP/s: out·b² flops).
- ``sweep``: ``safe_delta_sweep`` on the whole Linear, DELTAFIX_KERNELS=torch against auto.
- ``projection kN``: ``U_k (U_kᵀ δ)`` with torch (cuBLAS), no kernel by design; its bandwidth
  and FLOP rate are recorded to show where it stands against the roofline.

    PYTHONPATH=. python benchmarks/kernels.py [--shapes 4096x4096,11008x4096,4096x11008] [--ranks 8,64,512]
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from deltafix import kernels
from deltafix.kernels import build, cuda, safedelta_ref
from deltafix.methods.safedelta import BUDGET_HIDDEN_SIZE, hessian_inverse_factor, safe_delta_sweep

PEAK_BANDWIDTH_GBS = {  # by substring of torch.cuda.get_device_name(), most specific first
    "GH200": 4000, "H200": 4800, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350,
    "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "L40": 864, "L4": 300,
    "A10G": 600, "A10": 600, "RTX 4090": 1008, "RTX 3090": 936, "V100": 900, "T4": 320,
}
PEAK_FP32_TFLOPS = {  # non-tensor-core fp32 (torch matmuls are fp32 unless TF32 is allowed)
    "H200": 67.0, "H100 NVL": 60.0, "H100 PCIe": 51.0, "H100": 67.0, "A100": 19.5, "L40S": 91.6,
    "L40": 90.5, "L4": 30.3, "A10G": 31.2, "A10": 31.2, "RTX 4090": 82.6, "RTX 3090": 35.6,
    "V100": 15.7, "T4": 8.1,
}
BLOCK = 2048


@dataclass
class Row:
    path: str
    shape: str
    torch_ms: float
    kernel_ms: float | None = None
    bytes_moved: float | None = None
    flops: float | None = None


def by_name(table: dict[str, float], name: str) -> float | None:
    return next((value for key, value in table.items() if key in name), None)


def time_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median of ``repeats`` timed calls after one warm-up, in milliseconds (CUDA events)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_bandwidth() -> tuple[float, str]:
    """(GB/s, where it came from): the table, else a 1 GiB device-to-device copy."""
    name = torch.cuda.get_device_name()
    known = by_name(PEAK_BANDWIDTH_GBS, name)
    if known is not None:
        return known, f"datasheet peak of {name}"
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6, f"measured copy on {name}"


@contextmanager
def kernel_choice(mode: str) -> Iterator[None]:
    """Run the enclosed code with ``DELTAFIX_KERNELS=mode``."""
    previous = os.environ.get(kernels.KERNELS_ENV)
    os.environ[kernels.KERNELS_ENV] = mode
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(kernels.KERNELS_ENV)
        else:
            os.environ[kernels.KERNELS_ENV] = previous


def synthetic_layer(out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_A, W_F (out, in) fp32 with a small delta, and U (in, in) of a correlated SPD H."""
    g = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(inp + 512, inp, generator=g, device="cuda")
    X += torch.randn(inp + 512, 1, generator=g, device="cuda") * torch.randn(inp, generator=g, device="cuda")
    w_aligned = 0.02 * torch.randn(out, inp, generator=g, device="cuda")
    w_finetuned = w_aligned + 0.001 * torch.randn(out, inp, generator=g, device="cuda")
    return w_aligned, w_finetuned, hessian_inverse_factor(2 / X.shape[0] * X.T @ X, 0.01)


def safedelta_rows(out: int, inp: int, ext: object | None) -> list[Row]:
    w_aligned, w_finetuned, Hinv = synthetic_layer(out, inp)
    b = min(BLOCK, inp)
    w, wf, U = w_aligned[:, :b], w_finetuned[:, :b], Hinv[:b, :b]
    kappa = 1.0 / U.diagonal().square()
    budget = 0.05 * (out / BUDGET_HIDDEN_SIZE) * kappa.mean().item()
    keep = safedelta_ref.select_block(wf, w, kappa, budget, 0.15).keep
    shape = f"{out}x{inp}"
    select = Row("select", shape, time_ms(lambda: safedelta_ref.select_block(wf, w, kappa, budget, 0.15)),
                 bytes_moved=out * b * (4 + 4 + 1))
    compensate = Row("compensate", shape, time_ms(lambda: safedelta_ref.compensate_block(w, wf, keep, U, 4)),
                     bytes_moved=out * b * (4 + 4 + 1 + 4 + 4) + b * b * 4, flops=out * b * b)
    with kernel_choice("torch"):
        sweep = Row("sweep", shape, time_ms(lambda: safe_delta_sweep(w_aligned, w_finetuned, Hinv, scale=0.1), 2))
    if ext is not None:
        select.kernel_ms = time_ms(lambda: cuda.select_block(ext, wf, w, kappa, budget, 0.15))
        compensate.kernel_ms = time_ms(lambda: cuda.compensate_block(ext, w, wf, keep, U, 4))
        with kernel_choice("cuda"):
            sweep.kernel_ms = time_ms(lambda: safe_delta_sweep(w_aligned, w_finetuned, Hinv, scale=0.1), 2)
    return [select, compensate, sweep]


def projection_rows(out: int, inp: int, ranks: list[int]) -> list[Row]:
    g = torch.Generator(device="cuda").manual_seed(1)
    delta = torch.randn(out, inp, generator=g, device="cuda")
    rows = []
    for k in ranks:
        U = torch.linalg.qr(torch.randn(out, k, generator=g, device="cuda")).Q
        ms = time_ms(lambda: U @ (U.T @ delta))
        rows.append(Row(f"projection k{k}", f"{out}x{inp}", ms,
                        bytes_moved=4 * (2 * out * inp + 2 * out * k + 2 * k * inp), flops=4 * out * inp * k))
    return rows


def print_table(rows: list[Row], bandwidth: float, tflops: float | None) -> None:
    header = (f"{'hot path':<16}{'shape':>12}{'torch ms':>11}{'kernel ms':>11}{'speedup':>9}"
              f"{'GB/s':>9}{'% peak BW':>11}{'TFLOP/s':>9}{'% peak FP32':>13}")
    print(header)
    print("-" * len(header))
    for r in rows:
        best = r.kernel_ms if r.kernel_ms is not None else r.torch_ms
        kernel = f"{r.kernel_ms:11.3f}" if r.kernel_ms is not None else f"{'n/a':>11}"
        speedup = f"{r.torch_ms / r.kernel_ms:8.1f}x" if r.kernel_ms is not None else f"{'':>9}"
        gbs = r.bytes_moved / best / 1e6 if r.bytes_moved else None
        bw = f"{gbs:9.0f}{100 * gbs / bandwidth:10.1f}%" if gbs else f"{'':>20}"
        tf = r.flops / best / 1e9 if r.flops else None
        fl = f"{tf:9.2f}" + (f"{100 * tf / tflops:12.1f}%" if tflops else f"{'':>13}") if tf else ""
        print(f"{r.path:<16}{r.shape:>12}{r.torch_ms:11.3f}{kernel}{speedup}{bw}{fl}".rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="comma-separated OUTxIN")
    parser.add_argument("--ranks", default="8,64,512", help="projection ranks k")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark (the kernels run on CUDA tensors only).")
        return
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    ranks = [int(k) for k in args.ranks.split(",")]
    loaded = build.load()
    bandwidth, source = peak_bandwidth()
    tflops = by_name(PEAK_FP32_TFLOPS, torch.cuda.get_device_name())
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}; peak bandwidth {bandwidth:.0f} GB/s ({source}); "
          f"fp32 peak {f'{tflops} TFLOP/s' if tflops else 'unknown'}; "
          f"TF32 matmuls {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}")
    print(f"CUDA extension: {'loaded from ' + str(loaded.build_dir) if loaded.module else 'unavailable: ' + str(loaded.reason)}")
    print(f"bandwidth and FLOP rate are of the kernel where there is one, else of torch; blocks of {BLOCK} columns")
    rows = []
    for out, inp in shapes:
        rows += safedelta_rows(out, inp, loaded.module)
        rows += projection_rows(out, inp, ranks)
        torch.cuda.empty_cache()
    print_table(rows, bandwidth, tflops)


if __name__ == "__main__":
    main()
