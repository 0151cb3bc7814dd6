"""The piece-wise stream of elementwise methods against the whole-tensor stream, and the reader's
mapped ranges it is built on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltafix.engine import stream
from deltafix.errors import InputError
from deltafix.io.reader import CheckpointReader
from deltafix.methods import get_method
from deltafix.methods.resta import RestaParams
from deltafix.engine.plan import build_plan

from conftest import write_sharded

VOCAB, HIDDEN, GROWN = 37, 16, 3
LINEAR = "model.layers.0.mlp.down_proj.weight"


def checkpoints(root: Path) -> dict[str, CheckpointReader]:
    """P (fp16), A (bf16), F (fp32, 3 new vocabulary rows), sharded: mixed dtypes on purpose."""
    gen = torch.Generator().manual_seed(0)

    def tensors(dtype: torch.dtype, vocab: int) -> dict[str, torch.Tensor]:
        return {"model.embed_tokens.weight": torch.randn(vocab, HIDDEN, generator=gen).to(dtype),
                LINEAR: torch.randn(HIDDEN, 2 * HIDDEN, generator=gen).to(dtype),
                "model.norm.weight": torch.randn(HIDDEN, generator=gen).to(dtype)}

    folders = {"unaligned": write_sharded(root / "P", tensors(torch.float16, VOCAB), 2),
               "aligned": write_sharded(root / "A", tensors(torch.bfloat16, VOCAB), 3),
               "finetuned": write_sharded(root / "F", tensors(torch.float32, VOCAB + GROWN), 2)}
    return {role: CheckpointReader(folder) for role, folder in folders.items()}


def run(readers: dict[str, CheckpointReader], params: RestaParams, dtype: torch.dtype | None = None
        ) -> dict[str, tuple[torch.Tensor, dict[str, float] | None]]:
    plan = build_plan(readers["aligned"], readers["finetuned"], readers["unaligned"], dtype)
    return {spec.name: (tensor, stats) for spec, tensor, stats in
            stream.repaired_tensors(get_method("resta"), params, readers, plan, torch.device("cpu"))}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_pieces_equal_the_whole_tensor_formula_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           dtype: torch.dtype | None) -> None:
    readers = checkpoints(tmp_path)
    monkeypatch.setattr(stream, "CPU_PIECE", 7 * HIDDEN + 5)  # pieces straddle rows and the grown-row boundary
    assert stream.streams_in_pieces(get_method("resta"), RestaParams(scale=0.5), readers)
    out = run(readers, RestaParams(scale=0.5), dtype)
    for name, (tensor, stats) in out.items():
        f = readers["finetuned"].get(name).float()
        a = readers["aligned"].get(name).float()
        p = readers["unaligned"].get(name).float()
        kept = a.shape[0]
        expected = f.clone()
        expected[:kept] = torch.add(f[:kept], a - p, alpha=0.5)
        assert tensor.dtype == (dtype or torch.float32)
        assert torch.equal(tensor, expected.to(tensor.dtype)), name
        if name == LINEAR:
            assert stats["delta_norm_before"] == pytest.approx(torch.linalg.vector_norm(f - a).item(), rel=1e-6)
            assert stats["delta_norm_after"] == pytest.approx(
                torch.linalg.vector_norm(expected - a).item(), rel=1e-6)
        else:
            assert stats is None
    assert out["model.embed_tokens.weight"][0].shape == (VOCAB + GROWN, HIDDEN)


def test_pieces_and_whole_tensors_give_the_same_output_and_stats(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    readers = checkpoints(tmp_path)
    assert not stream.streams_in_pieces(get_method("resta"), RestaParams(scale=0.5, dare=0.3), readers)
    monkeypatch.setattr(stream, "CPU_PIECE", 50)
    pieces = run(readers, RestaParams(scale=0.75))
    monkeypatch.setattr(stream, "streams_in_pieces", lambda *args: False)
    whole = run(readers, RestaParams(scale=0.75))
    assert pieces.keys() == whole.keys()
    for name, (tensor, stats) in pieces.items():
        assert torch.equal(tensor, whole[name][0]), name
        assert stats == (None if whole[name][1] is None else pytest.approx(whole[name][1], rel=1e-6))


def test_nonfinite_in_a_later_piece_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readers = checkpoints(tmp_path)
    f = {n: readers["finetuned"].get(n).clone() for n in readers["finetuned"].names}
    f[LINEAR][-1, -1] = float("nan")
    readers["finetuned"] = CheckpointReader(write_sharded(tmp_path / "Fnan", f, 1))
    monkeypatch.setattr(stream, "CPU_PIECE", 64)
    with pytest.raises(InputError, match="NaN or Inf"):
        run(readers, RestaParams(scale=0.5))


def test_mapped_views_any_range_and_rejects_one_outside_the_tensor(tmp_path: Path) -> None:
    reader = checkpoints(tmp_path)["aligned"]
    whole = reader.get(LINEAR).reshape(-1)
    assert torch.equal(reader.mapped(LINEAR, 29, 11), whole[29:40])
    assert torch.equal(reader.mapped(LINEAR, whole.numel() - 11, 11), whole[-11:])
    assert reader.mapped(LINEAR, 5, 0).numel() == 0
    with pytest.raises(ValueError):
        reader.mapped(LINEAR, whole.numel() - 10, 11)


def test_dry_run_estimates_the_piece_stream_by_its_buffers(tmp_path: Path) -> None:
    from deltafix.engine.pipeline import RepairOptions, run_repair

    checkpoints(tmp_path)

    def estimate(params: RestaParams) -> int:
        opts = RepairOptions(base=str(tmp_path / "A"), finetuned=str(tmp_path / "F"), unaligned=str(tmp_path / "P"),
                             out=tmp_path / "R", method="resta", params=params, dry_run=True, progress=False)
        memory = run_repair(opts).memory
        assert memory is not None
        return next(part.bytes for part in memory.parts if part.name == "tensors")

    largest_fp32 = (VOCAB + GROWN) * HIDDEN * 4  # F's embedding, the largest tensor (fp32 output)
    # Each worker: a one-piece fp32 buffer per input and its window of each input, here all of it.
    buffers = stream.piece_workers() * 3 * (stream.CPU_PIECE * 4 + largest_fp32)
    assert estimate(RestaParams(scale=0.5)) == 2 * largest_fp32 + buffers
    assert estimate(RestaParams(scale=0.5, dare=0.3)) == largest_fp32 * (3 + 2)
    assert not (tmp_path / "R").exists()
