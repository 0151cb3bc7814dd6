"""``--dtype``: the written ``config.json`` names the dtype the weights were written in."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from deltafix.cli import main
from deltafix.io.assets import state_dtype
from tests.conftest import save_tiny_llama


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A and F (F = A + noise) stored in bfloat16, whose configs say ``"dtype": "bfloat16"``."""
    root = tmp_path_factory.mktemp("bf16")
    a = save_tiny_llama(root / "A", seed=1, dtype=torch.bfloat16)
    return {"A": a, "F": save_tiny_llama(root / "F", seed=2, base=a, dtype=torch.bfloat16)}


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _repair(pair: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["repair", "--base", str(pair["A"]), "--finetuned", str(pair["F"]), "--unaligned", str(pair["A"]),
                 "--out", str(out), "--method", "resta", "--device", "cpu", "--json", *extra])


def test_float16_output_config_says_float16_and_loads_so(tmp_path: Path, bf16_pair: dict[str, Path]) -> None:
    before = {k: _sha(v) for k, v in bf16_pair.items()}
    assert json.loads((bf16_pair["F"] / "config.json").read_text())["dtype"] == "bfloat16"
    out = tmp_path / "R"
    assert _repair(bf16_pair, out, "--dtype", "float16") == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert {fh.get_slice(name).get_dtype() for name in fh.keys()} == {"F16"}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16" and "torch_dtype" not in config
    expected = json.loads((bf16_pair["F"] / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "dtype"} == {k: v for k, v in expected.items() if k != "dtype"}
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.float16
    assert {k: _sha(v) for k, v in bf16_pair.items()} == before


def test_auto_dtype_keeps_the_config_byte_for_byte(tmp_path: Path, bf16_pair: dict[str, Path]) -> None:
    out = tmp_path / "R"
    assert _repair(bf16_pair, out) == 0
    assert (out / "config.json").read_bytes() == (bf16_pair["F"] / "config.json").read_bytes()
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16


@pytest.mark.parametrize(("config", "stated"), [
    ({"model_type": "llama", "torch_dtype": "bfloat16"}, {"model_type": "llama", "torch_dtype": "float16"}),
    ({"model_type": "llama", "dtype": "bfloat16", "torch_dtype": "bfloat16"},
     {"model_type": "llama", "dtype": "float16", "torch_dtype": "float16"}),
    ({"model_type": "llama"}, {"model_type": "llama", "dtype": "float16"}),
    ({"model_type": "llava", "dtype": "bfloat16", "text_config": {"torch_dtype": "bfloat16", "hidden_size": 8}},
     {"model_type": "llava", "dtype": "float16", "text_config": {"torch_dtype": "float16", "hidden_size": 8}}),
])
def test_every_dtype_key_the_config_has_is_set(tmp_path: Path, config: dict, stated: dict) -> None:
    src, copy = tmp_path / "src.json", tmp_path / "copy.json"
    src.write_text(json.dumps(config))
    copy.write_text(json.dumps(config))
    state_dtype(src, copy, torch.float16)
    assert json.loads(copy.read_text()) == stated
    assert json.loads(src.read_text()) == config
