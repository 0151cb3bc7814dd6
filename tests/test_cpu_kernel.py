"""RESTA's CPU kernel (``cuda_ext/resta_cpu.c``): the same bits as the torch path, its norms, the
stream using it, and its build plumbing. Skipped where there is no C compiler."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

from deltafix import kernels

from deltafix.engine import stream
from deltafix.errors import InputError
from deltafix.io.reader import CheckpointReader
from deltafix.kernels import cpu
from deltafix.methods import get_method
from deltafix.methods.resta import RestaParams
from deltafix.engine.plan import build_plan

from conftest import write_sharded

needs_cc = pytest.mark.skipif(cpu.compiler() is None, reason="needs a C compiler")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LINEAR = "model.layers.0.mlp.down_proj.weight"
cpu_resta = cpu.resta


@pytest.fixture
def fresh_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A private kernel cache, and ``cpu.load`` forgetting its outcome before and after."""
    monkeypatch.setenv("DELTAFIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DELTAFIX_KERNELS", raising=False)
    cpu.load.cache_clear()
    yield
    cpu.load.cache_clear()


def built(dtype: torch.dtype) -> None:
    if dtype not in cpu.load().functions:
        pytest.skip(f"the kernel was not built for {dtype} here: {cpu.load().reason or 'no such type in C'}")


def inputs(n: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F, A, P with rounding edges: signed zeros, values near the dtype's largest, subnormal sums."""
    gen = torch.Generator().manual_seed(seed)
    f, a, p = (torch.randn(n, generator=gen) * 0.02 for _ in range(3))
    big = torch.finfo(dtype).max
    f[:4] = torch.tensor([-0.0, 0.0, 0.9 * big, -0.9 * big])
    a[:4] = torch.tensor([1e-3, 1e-3, 0.5 * big, -0.5 * big])
    p[:4] = torch.tensor([1e-3, 1e-3, -0.5 * big, 0.5 * big])  # A − P = ±big: the result overflows to ±Inf
    return f.to(dtype), a.to(dtype), p.to(dtype)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.5, 0.3, 1.0, -0.25])
def test_kernel_gives_the_torch_bits_and_exact_norms(fresh_load: None, dtype: torch.dtype, scale: float) -> None:
    built(dtype)
    n = 3 * 4096 + 13  # several blocks of the kernel's partial sums, and a ragged tail
    f, a, p = inputs(n, dtype)
    out = torch.empty(n, dtype=dtype)
    assert kernels.resta_stream(f, a, p, out, scale) is not None
    result = torch.add(f.float(), a.float() - p.float(), alpha=scale)
    assert torch.equal(out, result.to(dtype))
    moderate = slice(4, None)  # the norms, without the overflowing entries, against float64
    before, after = kernels.resta_stream(f[moderate], a[moderate], p[moderate], out[moderate], scale)
    assert before == pytest.approx((f[moderate].double() - a[moderate].double()).square().sum().item(), rel=1e-5)
    assert after == pytest.approx((result[moderate].double() - a[moderate].double()).square().sum().item(), rel=1e-5)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_zero_copies_f_bit_for_bit(fresh_load: None, dtype: torch.dtype) -> None:
    built(dtype)
    f, a, p = inputs(1000, dtype, seed=1)
    f[10], a[11] = float("nan"), float("inf")
    out = torch.empty_like(f)
    before, after = kernels.resta_stream(f, a, p, out, 0.0)
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       f.view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert math.isnan(before) and math.isnan(after)


@needs_cc
def test_kernel_declines_what_it_cannot_take(fresh_load: None) -> None:
    f, a, p = inputs(64, torch.bfloat16)
    out = torch.empty(64, dtype=torch.bfloat16)
    assert kernels.resta_stream(f, a.float(), p, out, 0.5) is None  # mixed dtypes
    assert kernels.resta_stream(f, a, p[:63], out, 0.5) is None  # lengths differ
    assert kernels.resta_stream(f.double(), a.double(), p.double(), out.double(), 0.5) is None  # no float64 kernel
    assert kernels.resta_stream(f, a, None, out, 0.5) is None
    odd = torch.frombuffer(bytearray(129), dtype=torch.bfloat16, offset=1)  # at an odd address, as a map may give
    assert kernels.resta_stream(odd, a, p, out, 0.5) is None


def bf16_checkpoints(root: Path, nan_at: tuple[str, int] | None = None) -> dict[str, CheckpointReader]:
    """P, A, F all bf16 (what the kernel takes), F with 3 new vocabulary rows; optionally a NaN in F."""
    gen = torch.Generator().manual_seed(3)

    def tensors(vocab: int) -> dict[str, torch.Tensor]:
        return {"model.embed_tokens.weight": torch.randn(vocab, 24, generator=gen).bfloat16(),
                LINEAR: torch.randn(24, 1000, generator=gen).bfloat16(),
                "model.norm.weight": torch.randn(24, generator=gen).bfloat16()}

    f = tensors(40)
    if nan_at is not None:
        f[nan_at[0]].view(-1)[nan_at[1]] = float("nan")
    folders = {"unaligned": write_sharded(root / "P", tensors(37), 2),
               "aligned": write_sharded(root / "A", tensors(37), 1),
               "finetuned": write_sharded(root / "F", f, 2)}
    return {role: CheckpointReader(folder) for role, folder in folders.items()}


def run(readers: dict[str, CheckpointReader], params: RestaParams
        ) -> dict[str, tuple[torch.Tensor, dict[str, float] | None]]:
    plan = build_plan(readers["aligned"], readers["finetuned"], readers["unaligned"], None)
    return {spec.name: (tensor, stats) for spec, tensor, stats in
            stream.repaired_tensors(get_method("resta"), params, readers, plan, torch.device("cpu"))}


@needs_cc
@pytest.mark.parametrize("scale", [0.5, 0.0])
def test_stream_through_the_kernel_equals_the_torch_path(fresh_load: None, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    readers = bf16_checkpoints(tmp_path)
    monkeypatch.setattr(stream, "CPU_PIECE", 1000)  # several windows per weight, one straddling the new rows
    calls = []
    monkeypatch.setattr(cpu, "resta", lambda *args: calls.append(args[0].numel()) or cpu_resta(*args))
    fused = run(readers, RestaParams(scale=scale))
    assert sum(calls) == sum(readers["aligned"].info(n).numel for n in readers["aligned"].names)
    monkeypatch.setenv("DELTAFIX_KERNELS", "torch")
    reference = run(readers, RestaParams(scale=scale))
    for name, (tensor, stats) in fused.items():
        assert torch.equal(tensor, reference[name][0]), name
        assert stats == (None if reference[name][1] is None else pytest.approx(reference[name][1], rel=1e-5))
    assert fused["model.embed_tokens.weight"][0].shape == (40, 24)


@needs_cc
@pytest.mark.parametrize("where", [(LINEAR, 23_999), ("model.norm.weight", 5), ("model.embed_tokens.weight", 39 * 24)])
def test_nonfinite_f_is_refused_through_the_kernel(fresh_load: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   where: tuple[str, int]) -> None:
    readers = bf16_checkpoints(tmp_path, nan_at=where)  # the last entries, a norm, a new vocabulary row
    monkeypatch.setattr(stream, "CPU_PIECE", 1000)
    with pytest.raises(InputError, match="NaN or Inf"):
        run(readers, RestaParams(scale=0.5))


def test_no_compiler_means_the_torch_path(fresh_load: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "compiler", lambda: None)
    assert cpu.load().reason == "no C compiler found (install gcc or clang, or set CC)"
    f, a, p = inputs(64, torch.bfloat16)
    assert kernels.resta_stream(f, a, p, torch.empty_like(f), 0.5) is None


def test_failed_build_says_why(fresh_load: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "false")  # found on PATH, fails every call
    loaded = cpu.load()
    assert not loaded.functions and loaded.reason.startswith("the build failed (CalledProcessError")
    assert not any(Path(cpu.cpu_kernel_cache_dir()).rglob("*.so"))


@needs_cc
def test_build_is_cached_per_source_and_compiler(fresh_load: None, monkeypatch: pytest.MonkeyPatch) -> None:
    library = cpu.load().library
    assert library is not None and library.parent.parent == cpu.cpu_kernel_cache_dir()
    assert [p.name for p in library.parent.iterdir()] == [cpu.LIBRARY]  # no temporary file left
    cpu.load.cache_clear()
    assert cpu.load().library == library
    cc = cpu.compiler()
    assert cpu.build_key([*cc, "-DDELTAFIX_OTHER"]) != cpu.build_key(cc)


@needs_cc
def test_ahead_of_time_build_makes_the_cpu_kernel(tmp_path: Path) -> None:
    env = {**os.environ, "DELTAFIX_CACHE": str(tmp_path / "cache")}
    env.pop("DELTAFIX_KERNELS", None)
    done = subprocess.run([sys.executable, "-m", "deltafix.kernels"], capture_output=True, text=True, env=env)
    built_here = list((tmp_path / "cache" / "cpu_ext").glob(f"*/{cpu.LIBRARY}"))
    assert len(built_here) == 1
    assert done.stdout.splitlines()[0] == f"deltafix CPU kernel ready in {built_here[0]}"
