"""Kernel dispatch, the CUDA extension's build plumbing, ``deltafix doctor``, and the kernels
themselves against the torch reference: on the CPU through an emulation of the CUDA sources
(tests/kernel_emulation), on a GPU for real (marked ``gpu``, skipped without CUDA)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

from deltafix import kernels
from deltafix.cli import main
from deltafix.errors import OptionError
from deltafix.kernels import build, cpu, cuda, safedelta_ref, sources
from deltafix.methods.safedelta import hessian_inverse_factor, safe_delta, safe_delta_sweep

EMULATION_SOURCE = Path(__file__).parent / "kernel_emulation" / "emulation.cpp"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def random_layer(out: int, inp: int, seed: int = 0, device: str = "cpu"):
    """W_A, W_F (out, in) fp32 with a small delta, and U (in, in), the upper factor of H⁻¹."""
    g = torch.Generator(device=device).manual_seed(seed)
    X = torch.randn(inp + 64, inp, generator=g, device=device)
    X += torch.randn(inp + 64, 1, generator=g, device=device) * torch.randn(inp, generator=g, device=device)
    H = 2 / X.shape[0] * X.T @ X
    w_aligned = 0.02 * torch.randn(out, inp, generator=g, device=device)
    w_finetuned = w_aligned + 0.002 * torch.randn(out, inp, generator=g, device=device)
    return w_aligned, w_finetuned, hessian_inverse_factor(H, 0.01)


def budget_for(w_finetuned: torch.Tensor, w: torch.Tensor, kappa: torch.Tensor, share: float) -> float:
    """A selection budget of ``share`` times the block's total cost Σ (W_F − W)² κ."""
    return share * ((w_finetuned.double() - w.double()).square() * kappa.double()).sum().item()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def auto_mode(monkeypatch):
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)


# ---------------------------------------------------------------- dispatch (CPU)


@pytest.mark.parametrize("mode", ["auto", "torch"])
def test_cpu_tensors_use_the_reference(monkeypatch, mode):
    monkeypatch.setenv(kernels.KERNELS_ENV, mode)
    w_aligned, w_finetuned, Hinv = random_layer(24, 40)
    assert kernels.extension_for(torch.device("cpu")) is None
    kappa = 1.0 / Hinv.diagonal().square()
    budget = budget_for(w_finetuned, w_aligned, kappa, 0.3)
    got = kernels.select_block(w_finetuned, w_aligned, kappa, budget, 0.15)
    ref = safedelta_ref.select_block(w_finetuned, w_aligned, kappa, budget, 0.15)
    assert 0 < got.keep.sum() < got.keep.numel()
    assert torch.equal(got.keep, ref.keep) and got.kept_cost == ref.kept_cost
    q, err = kernels.compensate_block(w_aligned, w_finetuned, got.keep, Hinv, 4)
    q_ref, err_ref = safedelta_ref.compensate_block(w_aligned, w_finetuned, got.keep, Hinv, 4)
    assert torch.equal(q, q_ref) and torch.equal(err, err_ref)


def test_torch_mode_runs_safe_delta(monkeypatch):
    w_aligned, w_finetuned, Hinv = random_layer(32, 48, seed=1)
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    default = safe_delta_sweep(w_aligned, w_finetuned, Hinv, scale=0.03, block=16)
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    forced = safe_delta_sweep(w_aligned, w_finetuned, Hinv, scale=0.03, block=16)
    assert 0.0 < forced.kept_fraction < 0.85
    assert torch.equal(forced.weight, default.weight) and torch.equal(forced.keep, default.keep)


@pytest.mark.skipif(build.unavailable_reason() is None, reason="the CUDA extension may be buildable here")
def test_forced_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "cuda")
    w_aligned, w_finetuned, Hinv = random_layer(8, 16)
    with pytest.raises(OptionError) as err:
        safe_delta_sweep(w_aligned, w_finetuned, Hinv)
    message = str(err.value)
    assert "DELTAFIX_KERNELS=cuda" in message and build.unavailable_reason() in message
    assert "\n" not in message


def test_failed_build_warns_once_and_falls_back(monkeypatch, caplog, auto_mode):
    """A CUDA device whose extension did not build: one warning line, then the reference."""
    failed = build.Extension(None, "the build failed in /tmp/x (RuntimeError: nvcc exited with 1)", None)
    monkeypatch.setattr(build, "load", lambda: failed)
    kernels._warn_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="deltafix.kernels"):
        assert kernels.extension_for(torch.device("cuda")) is None
        assert kernels.extension_for(torch.device("cuda")) is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "nvcc exited with 1" in messages[0] and "\n" not in messages[0]
    monkeypatch.setenv(kernels.KERNELS_ENV, "cuda")
    with pytest.raises(OptionError, match="nvcc exited with 1"):
        kernels.extension_for(torch.device("cuda"))
    kernels._warn_fallback.cache_clear()


def test_unknown_kernel_choice_is_rejected(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    with pytest.raises(OptionError, match="auto, torch or cuda"):
        kernels.extension_for(torch.device("cpu"))
    monkeypatch.setenv(kernels.KERNELS_ENV, " Torch ")
    assert kernels.kernel_mode() == "torch"


# ---------------------------------------------------------------- selection around the kernel (CPU)


@pytest.mark.parametrize(
    ("dtype_f", "dtype_w"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
     (torch.float16, torch.float16), (torch.float16, torch.bfloat16)],
)
@pytest.mark.parametrize("share", [0.0, 0.1, 0.6, 2.0])
def test_selection_from_column_sums_is_the_reference(dtype_f, dtype_w, share):
    """The torch steps around the cost kernel, fed the reference's column sums, give its mask:
    nothing kept, a cut inside a column, and the exclusion bound (2x the total cost)."""
    w_aligned, w_finetuned, Hinv = random_layer(40, 96, seed=2)
    wf, w = w_finetuned.to(dtype_f)[:, 16:80], w_aligned.to(dtype_w)[:, 16:80]
    kappa = 1.0 / Hinv[16:80, 16:80].diagonal().square()
    budget = budget_for(wf, w, kappa, share)
    ref = safedelta_ref.select_block(wf, w, kappa, budget, 0.15)
    got = cuda.select_from_column_cost(wf, w, kappa, budget, 0.15, ref.column_cost)
    assert torch.equal(got.keep, ref.keep)
    assert got.kept_cost.item() == pytest.approx(ref.kept_cost.item(), rel=1e-12)
    kept = int(ref.keep.sum())
    if share == 0.0:
        assert kept == 0
    elif share < 1.0:
        assert 0 < kept < 0.85 * ref.keep.numel() and kept % 40 != 0
    else:
        assert kept == ref.keep.numel() - int(0.15 * ref.keep.numel())


# ---------------------------------------------------------------- build plumbing and doctor (CPU)


def test_build_folder_follows_cache_and_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTAFIX_CACHE", str(tmp_path / "cache"))
    folder = build.build_dir()
    assert folder.parent == tmp_path / "cache" / "cuda_ext"
    key = folder.name
    assert f"py{sys.version_info.major}{sys.version_info.minor}" in key and build.source_hash() in key
    for name in (*build.SOURCES, *build.HEADERS):
        assert (sources.source_dir() / name).is_file(), name

    copy = tmp_path / "cuda_ext"
    shutil.copytree(sources.source_dir(), copy)
    monkeypatch.setattr(sources, "source_dir", lambda: copy)
    assert build.source_hash() in key
    with (copy / "safedelta_kernels.cuh").open("a") as fh:
        fh.write("\n// changed\n")
    assert build.source_hash() not in key


def test_doctor_json(monkeypatch, tmp_path, capsys, auto_mode):
    monkeypatch.setenv("DELTAFIX_CACHE", str(tmp_path / "cache"))
    cpu.load.cache_clear()  # forget a kernel loaded from another cache
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] == torch.__version__
    assert report["cuda_available"] == torch.cuda.is_available()
    assert len(report["devices"]) == torch.cuda.device_count()
    assert report["caches"] == {
        "deltafix": str(tmp_path / "cache"),
        "hessians": str(tmp_path / "cache" / "hessians"),
        "kernels": str(tmp_path / "cache" / "cuda_ext"),
        "cpu_kernels": str(tmp_path / "cache" / "cpu_ext"),
    }
    k = report["kernels"]
    assert k["mode"] == "auto" and k["cpu_tensors"] == "torch"
    c = k["cpu_kernel"]
    if cpu.compiler() is not None:  # the doctor built it into the cache
        assert c["loaded"] and c["resta_stream"] == "cpu" and Path(c["library"]).is_file()
        assert Path(c["library"]).is_relative_to(tmp_path / "cache" / "cpu_ext")
    else:
        assert not c["loaded"] and c["resta_stream"] == "torch" and "no C compiler" in c["reason"]
    assert set(k["hot_paths"]) == {"safedelta_select", "safedelta_compensate", "projection_apply"}
    assert k["hot_paths"]["projection_apply"] == "torch"
    if not k["extension"]["loaded"]:
        assert k["extension"]["reason"] and k["why"] == k["extension"]["reason"]
        assert k["hot_paths"]["safedelta_select"] == "torch"
    else:
        assert k["hot_paths"]["safedelta_select"] == "cuda"


@pytest.mark.skipif(build.unavailable_reason() is None, reason="the CUDA extension may be buildable here")
def test_doctor_says_why_cuda_is_off(monkeypatch, capsys):
    monkeypatch.setenv(kernels.KERNELS_ENV, "cuda")
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert f"CUDA extension: not available: {build.unavailable_reason()}" in text
    assert "safedelta_compensate   error" in text and "DELTAFIX_KERNELS=cuda" in text


def test_doctor_with_torch_kernels_says_the_cpu_kernel_is_off(monkeypatch, capsys):
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    assert main(["doctor"]) == 0
    assert "CPU kernel (RESTA's stream): not used: DELTAFIX_KERNELS=torch; RESTA streams through torch" \
        in capsys.readouterr().out


# ---------------------------------------------------------------- the CUDA sources, emulated on the CPU


@pytest.fixture(scope="session")
def emulated(request, tmp_path_factory):
    """The kernels of cuda_ext/safedelta_kernels.cuh compiled for the CPU (tests/kernel_emulation);
    built once into pytest's cache folder (about a minute), then reused."""
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available() or shutil.which("c++") is None:
        pytest.skip("needs ninja and a C++ compiler")
    cache = getattr(request.config, "cache", None)
    name = "deltafix_kernel_emulation"
    folder = cache.mkdir(name) if cache is not None else tmp_path_factory.mktemp(name)
    return cpp_extension.load(
        name="deltafix_kernel_emulation",
        sources=[str(EMULATION_SOURCE)],
        extra_include_paths=[str(sources.source_dir())],
        extra_cflags=["-O1"],
        build_directory=str(folder),
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype_f", [torch.float32, torch.bfloat16, torch.float16])
def test_emulated_kernels_match_the_reference(emulated, dtype_f):
    w_aligned, w_finetuned, Hinv = random_layer(37, 150, seed=3)
    i1, i2 = 20, 90  # a block inside a wider weight: rows of the inputs are padded
    wf, w = w_finetuned.to(dtype_f)[:, i1:i2], w_aligned[:, i1:i2]
    U = Hinv[i1:i2, i1:i2]
    kappa = 1.0 / U.diagonal().square()
    for w_sel in (w, w.to(dtype_f)):
        budget = budget_for(wf, w_sel, kappa, 0.3)
        ref = safedelta_ref.select_block(wf, w_sel, kappa, budget, 0.15)
        for chunks in (1, 3):
            column_cost = emulated.column_cost(wf, w_sel, kappa, chunks)
            torch.testing.assert_close(column_cost, ref.column_cost, rtol=1e-12, atol=0.0)
        got = cuda.select_from_column_cost(wf, w_sel, kappa, budget, 0.15, column_cost)
        assert 0 < got.keep.sum() < 0.85 * got.keep.numel()
        assert torch.equal(got.keep, ref.keep)

    q_ref, err_ref = safedelta_ref.compensate_block(w, wf, ref.keep, U, 4)
    for rows_per_block, sub_block in [(8, 4), (8, 1), (8, 7), (8, 40), (2, 4)]:
        q, err = emulated.compensate(w, wf, ref.keep, U, sub_block, rows_per_block)
        assert torch.equal(q[ref.keep], wf.float()[ref.keep])
        assert relative(q, q_ref) < 1e-6
        assert relative(err, err_ref) < 1e-5


# ---------------------------------------------------------------- the CUDA extension (GPU)


@pytest.fixture(scope="module")
def extension():
    reason = build.unavailable_reason()
    if reason is not None:
        pytest.skip(f"CUDA extension cannot be built: {reason}")
    loaded = build.load()
    if loaded.module is None:
        pytest.fail(f"CUDA extension failed to build: {loaded.reason}\n{loaded.detail or ''}")
    return loaded.module


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype_f", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_cuda_kernels_match_the_reference(extension, shape, dtype_f):
    out, inp = shape
    w_aligned, w_finetuned, Hinv = random_layer(out, inp, seed=4, device="cuda")
    w_f = w_finetuned.to(dtype_f)
    for i1 in range(0, inp, 2048):
        i2 = min(i1 + 2048, inp)
        U = Hinv[i1:i2, i1:i2]
        kappa = 1.0 / U.diagonal().square()
        for w_sel in (w_aligned[:, i1:i2], w_aligned[:, i1:i2].to(dtype_f)):
            budget = budget_for(w_f[:, i1:i2], w_sel, kappa, 0.3)
            ref = safedelta_ref.select_block(w_f[:, i1:i2], w_sel, kappa, budget, 0.15)
            got = cuda.select_block(extension, w_f[:, i1:i2], w_sel, kappa, budget, 0.15)
            torch.testing.assert_close(got.column_cost, ref.column_cost, rtol=1e-12, atol=0.0)
            assert torch.equal(got.keep, ref.keep)
            assert got.kept_cost.item() == pytest.approx(ref.kept_cost.item(), rel=1e-12)
        q_ref, err_ref = safedelta_ref.compensate_block(w_aligned[:, i1:i2], w_f[:, i1:i2], ref.keep, U, 4)
        q, err = cuda.compensate_block(extension, w_aligned[:, i1:i2], w_f[:, i1:i2], ref.keep, U, 4)
        assert torch.equal(q[ref.keep], w_f[:, i1:i2].float()[ref.keep])
        assert relative(q, q_ref) < 1e-5
        assert relative(err, err_ref) < 1e-5


@pytest.mark.gpu
@needs_cuda
def test_dispatch_on_cuda_tensors(extension, monkeypatch, auto_mode):
    assert kernels.extension_for(torch.device("cuda")) is extension
    assert kernels.extension_for(torch.device("cpu")) is None
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    assert kernels.extension_for(torch.device("cuda")) is None
    monkeypatch.setenv(kernels.KERNELS_ENV, "cuda")
    assert kernels.extension_for(torch.device("cpu")) is None


@pytest.mark.gpu
@needs_cuda
def test_safe_delta_on_cuda_matches_cpu(extension, auto_mode):
    w_aligned, w_finetuned, Hinv = random_layer(256, 512, seed=5)
    on_cpu = safe_delta_sweep(w_aligned, w_finetuned, Hinv, scale=0.5, block=128)
    on_gpu = safe_delta_sweep(w_aligned.cuda(), w_finetuned.cuda(), Hinv.cuda(), scale=0.5, block=128)
    assert 0.05 < on_cpu.kept_fraction < 0.85
    assert torch.equal(on_gpu.keep.cpu(), on_cpu.keep)
    assert relative(on_gpu.weight.cpu(), on_cpu.weight) < 1e-5
    assert on_gpu.est_safety_cost == pytest.approx(on_cpu.est_safety_cost, rel=1e-4)

    g = torch.Generator().manual_seed(6)
    X = torch.randn(600, 512, generator=g)
    H = 2 / 600 * X.T @ X
    full_cpu = safe_delta(w_aligned, w_finetuned, H, scale=0.5, block=128)
    full_gpu = safe_delta(w_aligned.cuda(), w_finetuned.cuda(), H.cuda(), scale=0.5, block=128)
    assert (full_gpu.keep.cpu() == full_cpu.keep).float().mean() > 0.999
    assert relative(full_gpu.weight.cpu(), full_cpu.weight) < 1e-3
