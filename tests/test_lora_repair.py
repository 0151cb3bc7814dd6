"""LoRA end to end: adapters repaired as adapters (asft, safelora) or merged (resta, --as-full, DoRA),
and the ``merge-lora`` QR merge written dense and as an adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig

from deltafix.cli import main
from deltafix.io.reader import CheckpointReader
from deltafix.methods import WeightTensors, get_method
from tests.conftest import save_tiny_llama
from tests.peft_models import LLAMA_LINEARS, peft_merged, save_adapter


@pytest.fixture(scope="module")
def lora_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    p = save_tiny_llama(root / "P", seed=0)
    a = save_tiny_llama(root / "A", seed=1, base=p)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEARS, init_lora_weights=False)
    dora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    return {"P": p, "A": a, "U": save_adapter(a, root / "U", lora, seed=3),
            "R": save_adapter(a, root / "Rf", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False), seed=4),
            "D": save_adapter(a, root / "D", dora, seed=5)}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {n: reader.get(n).float() for n in reader.names}


def _repair(inputs: dict[str, Path], adapter: str, out: Path, method: str, *extra: str) -> int:
    return main(["repair", "--base", str(inputs["A"]), "--finetuned", str(inputs[adapter]), "--unaligned",
                 str(inputs["P"]), "--out", str(out), "--method", method, "--json", *extra])


def _dense_reference(inputs: dict[str, Path], adapter: str, method: str, **params) -> dict[str, torch.Tensor]:
    """The same method on the dense merged fine-tune (PEFT's merge_and_unload), tensor by tensor."""
    spec = get_method(method)
    p = spec.params(**params)
    merged, a, u = peft_merged(inputs["A"], inputs[adapter]), _tensors(inputs["A"]), _tensors(inputs["P"])
    weights = [WeightTensors(n, a[n], merged[n], u[n], is_linear=".layers." in n and a[n].ndim == 2) for n in a]
    state = spec.survey(iter(weights), p) if spec.survey else None
    return {w.name: spec.repair(w, p, state).tensor for w in weights}


@pytest.mark.parametrize("method,params", [("asft", {"lam": 4.0}), ("safelora", {"k": 5})])
def test_low_rank_methods_keep_an_adapter(tmp_path: Path, lora_inputs, method, params,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "R"
    sets = [x for k, v in params.items() for x in ("--set", f"{k}={v}")]
    assert _repair(lora_inputs, "U", out, method, *sets) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["output"]["kind"] == "adapter"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    repaired = peft_merged(lora_inputs["A"], out)
    expected = _dense_reference(lora_inputs, "U", method, **params)
    for name, tensor in expected.items():
        torch.testing.assert_close(repaired[name], tensor, atol=1e-5, rtol=1e-4)
    changed = [n for n in expected if not torch.equal(expected[n], peft_merged(lora_inputs["A"], lora_inputs["U"])[n])]
    assert changed
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card


def test_as_full_and_dense_methods_merge(tmp_path: Path, lora_inputs, capsys: pytest.CaptureFixture[str]) -> None:
    full = tmp_path / "full"
    assert _repair(lora_inputs, "U", full, "asft", "--set", "lam=4.0", "--as-full") == 0
    assert json.loads(capsys.readouterr().out)["output"]["kind"] == "full"
    expected = _dense_reference(lora_inputs, "U", "asft", lam=4.0)
    got = _tensors(full)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=1e-4)
    resta = tmp_path / "resta"
    assert _repair(lora_inputs, "U", resta, "resta", "--set", "scale=0.3") == 0
    assert json.loads(capsys.readouterr().out)["output"]["kind"] == "full"
    expected = _dense_reference(lora_inputs, "U", "resta", scale=0.3)
    got = _tensors(resta)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=1e-4)


def test_dora_adapter_is_never_written_back_as_lora(tmp_path: Path, lora_inputs,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "R"
    assert _repair(lora_inputs, "D", out, "asft", "--set", "lam=4.0") == 0
    assert json.loads(capsys.readouterr().out)["output"]["kind"] == "full"
    expected = _dense_reference(lora_inputs, "D", "asft", lam=4.0)
    got = _tensors(out)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=1e-4)


def test_adapter_for_another_base_and_unknown_type(tmp_path: Path, lora_inputs,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    other = save_tiny_llama(tmp_path / "other", seed=9)
    config = json.loads((other / "config.json").read_text())
    wide = tmp_path / "wide"
    from tests.peft_models import tiny_llama

    tiny_llama(hidden=64).save_pretrained(wide)
    wrong = save_adapter(wide, tmp_path / "wrong", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    assert _repair(lora_inputs, "A", tmp_path / "o1", "resta") == 0
    capsys.readouterr()
    rc = main(["repair", "--base", str(lora_inputs["A"]), "--finetuned", str(wrong), "--unaligned",
               str(lora_inputs["P"]), "--out", str(tmp_path / "o2"), "--method", "resta"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "does not fit the base model" in err and len(err.splitlines()) == 1
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "base_model_name_or_path": "x"}))
    rc = main(["repair", "--base", str(lora_inputs["A"]), "--finetuned", str(ia3), "--unaligned",
               str(lora_inputs["P"]), "--out", str(tmp_path / "o3"), "--method", "resta"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "IA3" in err and len(err.splitlines()) == 1
    assert config["hidden_size"] == 32


def test_merge_lora_dense_and_adapter_agree(tmp_path: Path, lora_inputs, capsys: pytest.CaptureFixture[str]) -> None:
    dense, adapter = tmp_path / "dense", tmp_path / "adapter"
    common = ["--base", str(lora_inputs["A"]), "--user", str(lora_inputs["U"]), "--reinforce", str(lora_inputs["R"]),
              "--json"]
    assert main(["merge-lora", *common, "--out", str(dense)]) == 0
    assert main(["merge-lora", *common, "--out", str(adapter), "--as-adapter"]) == 0
    capsys.readouterr()
    merged_dense = _tensors(dense)
    merged_adapter = peft_merged(lora_inputs["A"], adapter)
    for name, tensor in merged_dense.items():
        torch.testing.assert_close(merged_adapter[name], tensor, atol=1e-5, rtol=1e-4)
    user_only = "model.layers.0.mlp.up_proj.weight"
    base = _tensors(lora_inputs["A"])[user_only]
    full_user = peft_merged(lora_inputs["A"], lora_inputs["U"])[user_only]
    torch.testing.assert_close(merged_dense[user_only], base + 0.5 * (full_user - base), atol=1e-6, rtol=1e-5)
    rc = main(["merge-lora", *common[:4], "--reinforce", str(lora_inputs["A"]), "--out", str(tmp_path / "bad")])
    assert rc == 2 and "adapter_config.json" in capsys.readouterr().err


@pytest.mark.parametrize("adapter", ["U", "D"])
def test_inspect_reads_an_adapter_as_repair_does(lora_inputs, adapter: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Each row's delta is PEFT's merged fine-tune minus A: LoRA and DoRA, touched modules only."""
    assert main(["inspect", "--base", str(lora_inputs["A"]), "--finetuned", str(lora_inputs[adapter]), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["tensors"]}
    a, merged = _tensors(lora_inputs["A"]), peft_merged(lora_inputs["A"], lora_inputs[adapter])
    assert set(rows) == set(a)
    for name, row in rows.items():
        expected = float(torch.linalg.vector_norm(merged[name].float() - a[name]))
        assert row["delta_norm"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    changed = {n for n, r in rows.items() if r["delta_norm"] > 0}
    targets = ("q_proj", "v_proj") if adapter == "D" else LLAMA_LINEARS
    assert changed == {n for n in a if n.endswith(".weight") and n.split(".")[-2] in targets}


def test_merge_lora_writes_the_recipe_its_card_names_and_reruns_from_it(
        tmp_path: Path, lora_inputs, capsys: pytest.CaptureFixture[str]) -> None:
    """OUT holds report, recipe and card as repair writes them; ``--recipe`` reruns the merge bit for bit."""
    user = tmp_path / "U"
    shutil.copytree(lora_inputs["U"], user)
    (user / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: peft\n---\nmy adapter\n")
    common = ["merge-lora", "--base", str(lora_inputs["A"]), "--user", str(user), "--reinforce",
              str(lora_inputs["R"]), "--json"]
    first, again, override = tmp_path / "one", tmp_path / "two", tmp_path / "three"
    assert main([*common, "--out", str(first), "--alpha", "0.3", "--scale", "0.7"]) == 0
    capsys.readouterr()
    recipe = yaml.safe_load((first / "deltafix_recipe.yaml").read_text())
    assert recipe == {"method": "qr-merge", "parameters": {"alpha": 0.3, "scale": 0.7}}
    report = json.loads((first / "deltafix_report.json").read_text())
    assert report["method"] == "qr-merge" and report["parameters"] == recipe["parameters"]
    assert report["peak_rss_bytes"] > 0 and report["inputs"]["finetuned"]["files"]["adapter_model.safetensors"]
    card = (first / "README.md").read_text()
    assert "`deltafix_recipe.yaml`" in card and "`deltafix_report.json`" in card and "license: apache-2.0" in card

    assert main([*common, "--out", str(again), "--recipe", str(first / "deltafix_recipe.yaml")]) == 0
    assert (again / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    assert (again / "deltafix_recipe.yaml").read_bytes() == (first / "deltafix_recipe.yaml").read_bytes()
    assert main([*common, "--out", str(override), "--recipe", str(first / "deltafix_recipe.yaml"),
                 "--scale", "0.5"]) == 0
    capsys.readouterr()
    assert yaml.safe_load((override / "deltafix_recipe.yaml").read_text())["parameters"] == {"alpha": 0.3, "scale": 0.5}
    assert (override / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()


@pytest.mark.parametrize(("text", "message"), [
    ("method: resta\nparameters: {scale: 0.5}\n", "is for method resta, which deltafix repair runs; merge-lora takes"),
    ("method: qr-merge\nparameters: {alpha: 2}\n", "alpha: Input should be less than or equal to 1, not 2."),
    ("method: qr-merge\nparameters: {beta: 1}\n", "unknown parameter 'beta' (merge-lora takes alpha and scale)."),
])
def test_merge_lora_refuses_a_recipe_it_cannot_run(tmp_path: Path, lora_inputs, text: str, message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "OUT"
    rc = main(["merge-lora", "--base", str(lora_inputs["A"]), "--user", str(lora_inputs["U"]), "--reinforce",
               str(lora_inputs["R"]), "--out", str(out), "--recipe", str(recipe)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err and not out.exists()
