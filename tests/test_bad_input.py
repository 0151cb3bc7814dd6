"""Every bad input gives one clear line on stderr, exit 2, OUT untouched, inputs unchanged."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch
from console import folder_digest
from safetensors.torch import load_file, save_file

from deltafix.cli import main
from deltafix.io import writer as writer_module


def _run(capsys: pytest.CaptureFixture[str], base: Path, finetuned: Path, out: Path, *extra: str) -> tuple[int, str]:
    rc = main(["repair", "--base", str(base), "--finetuned", str(finetuned), "--out", str(out),
               "--method", "resta", "--unaligned", str(base), *extra])
    err = capsys.readouterr().err.strip()
    return rc, err


def _expect_refusal(capsys, tmp_path: Path, trio, base: Path, finetuned: Path, match: str, *extra: str,
                    out: Path | None = None) -> None:
    out = out or tmp_path / "OUT"
    before = {k: folder_digest(v) for k, v in trio.items()}
    rc, err = _run(capsys, base, finetuned, out, *extra)
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert match in err
    assert {k: folder_digest(v) for k, v in trio.items()} == before
    assert not list(out.parent.glob(".deltafix-tmp-*"))


def _copy_with(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_nonexistent_path(tmp_path, trio, capsys) -> None:
    _expect_refusal(capsys, tmp_path, trio, trio["A"], tmp_path / "nope", "does not exist")
    assert not (tmp_path / "OUT").exists()


def test_folder_without_weights_and_bin_only(tmp_path, trio, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_refusal(capsys, tmp_path, trio, trio["A"], empty, "contains no safetensors")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    _expect_refusal(capsys, tmp_path, trio, trio["A"], pickled, "convert them to safetensors")


def test_corrupt_and_truncated_shards(tmp_path, trio, capsys) -> None:
    truncated = tmp_path / "truncated"
    shutil.copytree(trio["F"], truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-64])
    _expect_refusal(capsys, tmp_path, trio, trio["A"], truncated, "truncated or corrupt")
    garbage = tmp_path / "garbage"
    shutil.copytree(trio["F"], garbage)
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    _expect_refusal(capsys, tmp_path, trio, trio["A"], garbage, "corrupt")


def test_index_pointing_to_missing_shard(tmp_path, trio, capsys) -> None:
    folder = tmp_path / "idx"
    shutil.copytree(trio["F"], folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    names = load_file(str(folder / "model-00001-of-00002.safetensors"))
    import json
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**{n: "model-00001-of-00002.safetensors" for n in names},
                        "extra.weight": "model-00002-of-00002.safetensors"}}))
    _expect_refusal(capsys, tmp_path, trio, trio["A"], folder, "missing shard")


def test_missing_tensor_and_shape_mismatch(tmp_path, trio, capsys) -> None:
    missing = _copy_with(trio["F"], tmp_path / "missing", lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    _expect_refusal(capsys, tmp_path, trio, trio["A"], missing, "lacks 1 tensor")
    shape = _copy_with(trio["F"], tmp_path / "shape",
                       lambda t: t.update({"model.layers.1.mlp.gate_proj.weight": torch.zeros(63, 32)}))
    _expect_refusal(capsys, tmp_path, trio, trio["A"], shape, "shape")


def test_nonfinite_refused_unless_allowed(tmp_path, trio, capsys) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")

    nan = _copy_with(trio["F"], tmp_path / "nan", poison)
    _expect_refusal(capsys, tmp_path, trio, trio["A"], nan, "NaN or Inf")
    assert not (tmp_path / "OUT").exists()
    rc, _ = _run(capsys, trio["A"], nan, tmp_path / "OUT", "--allow-nonfinite")
    assert rc == 0


def test_nonempty_out_and_out_inside_input(tmp_path, trio, capsys) -> None:
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _expect_refusal(capsys, tmp_path, trio, trio["A"], trio["F"], "--overwrite", out=out)
    assert (out / "keep.txt").read_text() == "mine"
    _expect_refusal(capsys, tmp_path, trio, trio["A"], trio["F"], "overlaps", out=trio["F"] / "sub")
    _expect_refusal(capsys, tmp_path, trio, trio["A"], trio["F"], "overlaps", "--overwrite", out=trio["F"])


def test_bad_options(tmp_path, trio, capsys) -> None:
    _expect_refusal(capsys, tmp_path, trio, trio["A"], trio["F"],
                    "unknown parameter 'nope' (it takes: target_asr, target_from, tune_prompts, scale, dare, seed)",
                    "--set", "nope=1")
    _expect_refusal(capsys, tmp_path, trio, trio["A"], trio["F"], "cannot read size", "--out-shard-size", "lots")
    _expect_refusal(capsys, tmp_path, trio, trio["A"], trio["F"], "'999KB' is 999000 bytes, below the smallest "
                    "allowed, 1MB", "--out-shard-size", "999KB")
    rc = main(["repair", "--base", str(trio["A"]), "--finetuned", str(trio["F"]), "--out", str(tmp_path / "o"),
               "--method", "nosuch"])
    assert rc == 2 and "unknown method" in capsys.readouterr().err


class _FullDisk:
    """A writable file that accepts ``budget`` bytes and then fails like a full disk."""

    def __init__(self, fh, budget: int) -> None:
        self._fh, self._budget = fh, budget

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self._budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._budget -= size
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()

    def fileno(self) -> int:
        return self._fh.fileno()

    def close(self) -> None:
        self._fh.close()


def test_disk_full_mid_write_leaves_nothing(tmp_path, trio, capsys, monkeypatch) -> None:
    real_open = Path.open

    def small_disk_open(self, mode="r", *args, **kwargs):
        fh = real_open(self, mode, *args, **kwargs)
        return _FullDisk(fh, 20_000) if "w" in mode and self.suffix == ".safetensors" else fh

    monkeypatch.setattr(Path, "open", small_disk_open)
    out = tmp_path / "OUT"
    _expect_refusal(capsys, tmp_path, trio, trio["A"], trio["F"], "no space left", out=out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupt_mid_write_leaves_nothing(tmp_path, trio, capsys, monkeypatch) -> None:
    def interrupted(self, name, tensor):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_module.ShardedWriter, "add", interrupted)
    out = tmp_path / "OUT"
    rc, err = _run(capsys, trio["A"], trio["F"], out)
    assert rc == 130 and not out.exists() and list(tmp_path.iterdir()) == []
