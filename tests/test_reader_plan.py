"""Lazy reader and plan validation on real tiny checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltafix.errors import InputError, MismatchError
from deltafix.hub.preflight import RemoteCheckpoint
from deltafix.io.overlay import open_finetuned
from deltafix.io.reader import CheckpointReader, TensorHeaders, TensorIndex
from deltafix.engine.plan import build_plan, is_decoder_linear
from tests.conftest import write_sharded


def test_reader_lists_headers_and_reads_lazily(trio: dict[str, Path]) -> None:
    reader = CheckpointReader(trio["A"])
    full = load_file(str(trio["A"] / "model.safetensors"))
    assert set(reader.names) == set(full)
    name = "model.layers.1.mlp.down_proj.weight"
    assert reader.info(name).shape == tuple(full[name].shape)
    assert torch.equal(reader.get(name), full[name])


def test_every_reader_is_a_tensor_index_and_a_remote_one_only_headers(trio: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    """Local readers (a folder, an adapter merged on the fly) share TensorIndex; the Hub pre-flight's
    header-only view offers TensorHeaders, all that build_plan asks for."""
    from peft import LoraConfig
    from peft_models import save_adapter

    lora = save_adapter(trio["A"], tmp_path / "lora", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    aligned = CheckpointReader(trio["A"])
    merged = open_finetuned(lora, aligned)
    header = SimpleNamespace(dtype="F32", shape=[2, 3], data_offsets=(0, 24))
    remote = RemoteCheckpoint("me/x", trio["A"], SimpleNamespace(files_metadata={
        "model.safetensors": SimpleNamespace(tensors={"w": header})}))
    assert isinstance(aligned, TensorIndex) and isinstance(merged, TensorIndex)
    assert isinstance(remote, TensorHeaders) and not isinstance(remote, TensorIndex)
    assert remote.info("w").shape == (2, 3) and remote.total_bytes() == 24
    assert build_plan(aligned, merged).tensors == build_plan(aligned, CheckpointReader(trio["A"])).tensors


def test_sharded_reader_keeps_one_shard_open(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.full((3, 2), float(i)) for i in range(7)}
    reader = CheckpointReader(write_sharded(tmp_path / "s", tensors, 3))
    assert len(reader.files) == 3
    for name in reader.names:
        assert torch.equal(reader.get(name), tensors[name])
        assert reader._open_file == reader.info(name).file


def test_truncated_shard_is_refused(tmp_path: Path, trio: dict[str, Path]) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(trio["F"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match="truncated or corrupt"):
        CheckpointReader(broken)


def test_index_pointing_to_missing_shard(tmp_path: Path) -> None:
    folder = write_sharded(tmp_path / "s", {"a": torch.zeros(2), "b": torch.ones(2)}, 2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match="missing shard"):
        CheckpointReader(folder)


def test_bin_only_folder_is_refused_with_what_to_do(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match="pass --allow-pickle .* never runs code"):
        CheckpointReader(tmp_path)


def test_plan_classifies_decoder_linears(trio: dict[str, Path]) -> None:
    plan = build_plan(CheckpointReader(trio["A"]), CheckpointReader(trio["F"]), CheckpointReader(trio["P"]))
    linear = set(plan.linear_names)
    assert "model.layers.0.self_attn.q_proj.weight" in linear
    assert "model.layers.1.mlp.down_proj.weight" in linear
    assert "model.embed_tokens.weight" not in linear
    assert "model.layers.0.input_layernorm.weight" not in linear
    assert len(linear) == 2 * 7
    assert not is_decoder_linear("lm_head.weight", (64, 32))


def _edit(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_plan_refuses_missing_and_mismatched(tmp_path: Path, trio: dict[str, Path]) -> None:
    a = CheckpointReader(trio["A"])
    missing = _edit(trio["F"], tmp_path / "missing", lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(MismatchError, match="lacks 1 tensor"):
        build_plan(a, CheckpointReader(missing))
    wrong = _edit(trio["F"], tmp_path / "wrong",
                  lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 31)}))
    with pytest.raises(MismatchError, match="shape"):
        build_plan(a, CheckpointReader(wrong))


def test_vocab_growth_is_kept_and_explained(tmp_path: Path, trio: dict[str, Path]) -> None:
    def grow(t: dict[str, torch.Tensor]) -> None:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            t[name] = torch.cat([t[name], torch.randn(3, t[name].shape[1])])

    grown = _edit(trio["F"], tmp_path / "grown", grow)
    config = json.loads((grown / "config.json").read_text())
    config["vocab_size"] += 3
    (grown / "config.json").write_text(json.dumps(config))
    plan = build_plan(CheckpointReader(trio["A"]), CheckpointReader(grown))
    rows = {t.name: t.grown_rows for t in plan.tensors}
    assert rows["model.embed_tokens.weight"] == 3 and rows["lm_head.weight"] == 3
    assert any("added 3 vocabulary rows" in n for n in plan.notes)
