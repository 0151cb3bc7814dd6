"""PEFT adapter reading/writing checked against PEFT's own merge_and_unload on tiny real models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig
from peft_models import (
    GPT2_CONV1DS,
    LLAMA_LINEARS,
    peft_merged,
    save_adapter,
    save_base,
    tiny_gpt2,
    tiny_llama,
)

from deltafix.errors import InputError, MismatchError
from deltafix.io.lora import LoraAdapter, is_adapter_folder, unit_scaling_config, write_adapter
from deltafix.io.reader import CheckpointReader

ADAPTERS = {
    "plain": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEARS + ["embed_tokens"])),
    "rslora": ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=LLAMA_LINEARS)),
    "patterns": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=LLAMA_LINEARS,
            rank_pattern={"v_proj": 2, r"layers\.1\..*k_proj": 6},
            alpha_pattern={"down_proj": 3, "model.layers.0.mlp.up_proj": 16},
        ),
    ),
    "dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=LLAMA_LINEARS)),
    "modules_to_save": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=GPT2_CONV1DS, fan_in_fan_out=True)),
    # Non-square Conv1Ds only: for a square one the shape cannot tell the layout and the config decides.
    "conv1d_config_says_linear": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])),
    "lora_bias": ("gpt2", dict(r=4, lora_alpha=8, target_modules=GPT2_CONV1DS, lora_bias=True, bias="lora_only")),
    "dora_conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=GPT2_CONV1DS, use_dora=True)),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {
        "llama": save_base(tiny_llama(), root / "llama"),
        # GPT-2 hub checkpoints store "h.0..." for the model's "transformer.h.0...": mimic that.
        "gpt2": save_base(tiny_gpt2(), root / "gpt2", strip_prefix="transformer."),
    }


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for case, (base, kwargs) in ADAPTERS.items():
        config = LoraConfig(init_lora_weights=False, **kwargs)
        out[case] = save_adapter(bases[base], root / case, config)
    # PEFT itself saves fan_in_fan_out=True after meeting Conv1D; older or hand-made configs say
    # False, and PEFT then picks the layout from the module type anyway.
    config_file = out["conv1d_config_says_linear"] / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "fan_in_fan_out": False}))
    return out


def merged_name(merged: dict, name: str) -> str:
    return name if name in merged else "transformer." + name


@pytest.mark.parametrize("case", list(ADAPTERS))
def test_every_tensor_matches_peft_merge(case, bases, adapters):
    base_folder = bases[ADAPTERS[case][0]]
    reader = CheckpointReader(base_folder)
    adapter = LoraAdapter.load(adapters[case], reader)
    merged = peft_merged(base_folder, adapters[case])
    assert adapter.modules and adapter.touched_names <= set(reader.names)
    for name in reader.names:
        base = reader.get(name)
        ours = adapter.updated(name, base) if name in adapter.touched_names else base
        expected = merged[merged_name(merged, name)]
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
        if name in adapter.touched_names:
            assert (ours - base).abs().max() > 1e-3, f"{name} should change"


def test_scaling_follows_patterns_and_rslora(adapters):
    rs = LoraAdapter.load(adapters["rslora"])
    assert all(m.scaling == pytest.approx(8 / 2) for m in rs.modules.values())
    pat = LoraAdapter.load(adapters["patterns"]).modules
    assert pat["model.layers.0.self_attn.v_proj.weight"].rank == 2
    assert pat["model.layers.1.self_attn.k_proj.weight"].rank == 6
    assert pat["model.layers.0.self_attn.k_proj.weight"].rank == 4
    assert pat["model.layers.1.mlp.down_proj.weight"].scaling == pytest.approx(3 / 4)
    assert pat["model.layers.0.mlp.up_proj.weight"].scaling == pytest.approx(16 / 4)
    assert pat["model.layers.1.mlp.up_proj.weight"].scaling == pytest.approx(8 / 4)


def test_layouts_kinds_and_names(bases, adapters):
    reader = CheckpointReader(bases["gpt2"])
    conv = LoraAdapter.load(adapters["conv1d_config_says_linear"], reader)
    # Names resolve to the prefix-less base; Conv1D layout is found from shapes as PEFT does.
    assert "h.0.attn.c_attn.weight" in conv.modules
    assert all(m.fan_in_fan_out for m in conv.modules.values())
    assert conv.modules["h.0.attn.c_attn.weight"].delta().shape == (32, 96)
    plain = LoraAdapter.load(adapters["plain"])
    emb = plain.modules["model.embed_tokens.weight"]
    assert emb.embedding and emb.fan_in_fan_out and emb.delta().shape == (64, 32)
    assert "model.embed_tokens.weight" in plain.replaced  # PEFT saves the embedding layer whole
    assert LoraAdapter.load(adapters["dora"]).is_dora and not plain.is_dora
    assert set(LoraAdapter.load(adapters["modules_to_save"]).replaced) == {"lm_head.weight"}
    assert is_adapter_folder(adapters["plain"]) and not is_adapter_folder(bases["llama"])


def test_dora_delta_needs_the_base_weight(adapters):
    module = next(iter(LoraAdapter.load(adapters["dora"]).modules.values()))
    with pytest.raises(ValueError):
        module.delta()


def test_config_round_trips_unknown_fields(adapters, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(adapters["plain"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["some_future_field"] = {"kept": True}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    adapter = LoraAdapter.load(folder)
    adapter.write(tmp_path / "b", {})
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text()) == config


def test_adapter_for_other_shapes_is_a_mismatch(bases, tmp_path):
    other = save_base(tiny_llama(hidden=48), tmp_path / "wide")
    adapter = save_adapter(other, tmp_path / "ad", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.raises(MismatchError, match="shape"):
        LoraAdapter.load(adapter, CheckpointReader(bases["llama"]))


def test_target_missing_in_base_is_a_mismatch(bases, tmp_path):
    deeper = save_base(tiny_llama(layers=3), tmp_path / "deep")
    adapter = save_adapter(deeper, tmp_path / "ad", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.raises(MismatchError, match="model.layers.2.self_attn.q_proj.weight"):
        LoraAdapter.load(adapter, CheckpointReader(bases["llama"]))


def edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(peft_type="IA3"), "only LoRA"),
        (dict(use_bdlora={"nblocks": 2}), "use_bdlora"),
        (dict(init_lora_weights="pissa"), "rewrites the base"),
        (dict(r=3), "rank 3"),
    ],
)
def test_bad_configs_are_input_errors(adapters, tmp_path, changes, message):
    with pytest.raises(InputError, match=message):
        LoraAdapter.load(edited_copy(adapters["plain"], tmp_path / "a", **changes))


def test_missing_config_is_an_input_error(adapters, tmp_path):
    shutil.copytree(adapters["plain"], tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").unlink()
    with pytest.raises(InputError, match="adapter_config.json"):
        LoraAdapter.load(tmp_path / "a")


def test_written_adapter_with_doubled_b_loads_in_peft(bases, adapters, tmp_path):
    reader = CheckpointReader(bases["llama"])
    adapter = LoraAdapter.load(adapters["plain"], reader)
    doubled = {name: (m.A, 2 * m.B) for name, m in adapter.modules.items()}
    write_adapter(
        tmp_path / "x2", adapter.config, doubled, modules=adapter.modules, extra_tensors=adapter.replacement_tensors()
    )
    once = peft_merged(bases["llama"], adapters["plain"])
    twice = peft_merged(bases["llama"], tmp_path / "x2")
    for name in adapter.modules:
        start = adapter.replacement(name) if name in adapter.replaced else reader.get(name)
        torch.testing.assert_close(twice[name] - start, 2 * (once[name] - start), atol=1e-5, rtol=0)


def test_unit_scaling_config_gives_each_module_its_rank(bases, adapters, tmp_path):
    adapter = LoraAdapter.load(adapters["plain"], CheckpointReader(bases["llama"]))
    picked = {n: m for n, m in adapter.modules.items() if "layers.1" in n and not m.embedding}
    ranks = {m.path: (3 if "q_proj" in n else 5) for n, m in picked.items()}
    config = unit_scaling_config(adapter.config, ranks)
    generator = torch.Generator().manual_seed(3)
    factors = {}
    for name, m in picked.items():
        r = ranks[m.path]
        A = torch.randn(r, m.A.shape[1], generator=generator)
        factors[name] = (A, torch.randn(m.B.shape[0], r, generator=generator))
    write_adapter(tmp_path / "u", config, factors)
    merged = peft_merged(bases["llama"], tmp_path / "u")
    reader = CheckpointReader(bases["llama"])
    for name in reader.names:
        expected = reader.get(name) + (factors[name][1] @ factors[name][0] if name in factors else 0)
        torch.testing.assert_close(merged[name], expected, atol=1e-5, rtol=0)
