"""Seconds per Linear for Safe Delta against a SparseGPT-style blocked OBS solve of the same shape.

DESIGN §7 target: Safe Delta per Linear no slower than a SparseGPT-style solve. Both share the
Hessian preparation (damp, Cholesky, inverse, Cholesky), timed once as ``factor``; the sweeps are
timed separately. The comparison solve is a minimal SparseGPT-style unstructured 50% prune
(blocks of 128 columns, column-by-column OBS updates inside, lazy batch updates after), written
here so that both sweeps run on the same tensors, the same memory layout and the same torch build.

    PYTHONPATH=. python benchmarks/safedelta.py [--shapes 4096x4096,11008x4096] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from deltafix.methods.safedelta import hessian_inverse_factor, safe_delta_sweep


def sparsegpt_style_sweep(W: torch.Tensor, Hinv: torch.Tensor, sparsity: float = 0.5, blocksize: int = 128) -> torch.Tensor:
    """Prune ``sparsity`` of W (out, in) to zero with OBS updates; ``Hinv`` the upper factor of H⁻¹.

    Works on Wᵀ (columns as contiguous rows), like ``compensate_block``, for a like-for-like timing.
    """
    W = W.T.contiguous()
    columns = W.shape[0]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[i1:i2].clone()
        Q1 = torch.empty_like(W1)
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        score = W1.square() / Hinv1.diagonal()[:, None].square()
        threshold = torch.sort(score.flatten()).values[int(score.numel() * sparsity)]
        prune = score <= threshold
        for i in range(i2 - i1):
            q = torch.where(prune[i], 0.0, W1[i])
            err = (W1[i] - q) / Hinv1[i, i]
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
            Q1[i] = q
            Err1[i] = err
        W[i1:i2] = Q1
        W[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)
    return W.T


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def synthetic_layer(out: int, inp: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_A, W_F (out, in) with a small delta, and a full-rank SPD H = (2/N) XᵀX of correlated X."""
    g = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(inp + 512, inp, generator=g, device=device)
    X += torch.randn(inp + 512, 1, generator=g, device=device) * torch.randn(inp, generator=g, device=device)
    H = 2 / X.shape[0] * X.T @ X
    w_aligned = 0.02 * torch.randn(out, inp, generator=g, device=device)
    w_finetuned = w_aligned + 0.001 * torch.randn(out, inp, generator=g, device=device)
    return w_aligned, w_finetuned, H


def bench(out: int, inp: int, device: torch.device) -> None:
    w_aligned, w_finetuned, H = synthetic_layer(out, inp, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_factor, Hinv = timed(lambda: hessian_inverse_factor(H, 0.01), device)
    t_safedelta, result = timed(lambda: safe_delta_sweep(w_aligned, w_finetuned, Hinv, scale=0.1), device)
    t_sparsegpt, _ = timed(lambda: sparsegpt_style_sweep(w_aligned, Hinv), device)
    line = (
        f"{device.type:4s} {out:>5d}x{inp:<5d}  factor {t_factor:7.2f} s  "
        f"safedelta sweep {t_safedelta:7.2f} s (total {t_factor + t_safedelta:7.2f} s, kept {result.kept_fraction:.3f})  "
        f"sparsegpt-style sweep {t_sparsegpt:7.2f} s (total {t_factor + t_sparsegpt:7.2f} s)  "
        f"ratio {(t_factor + t_safedelta) / (t_factor + t_sparsegpt):.2f}"
    )
    if device.type == "cuda":
        line += f"  peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,11008x4096", help="comma-separated OUTxIN shapes")
    parser.add_argument("--device", action="append", help="cpu and/or cuda (default: cpu, and cuda when available)")
    args = parser.parse_args()
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for device in devices:
        for out, inp in shapes:
            bench(out, inp, torch.device(device))


if __name__ == "__main__":
    main()
