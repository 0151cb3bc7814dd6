"""Pickle (.bin) inputs with ``--allow-pickle`` (issue 18): the tensors are loaded and repaired bit
for bit like their safetensors twin, a file whose unpickling would run code is refused before that
code runs, and without the flag the refusal names the flag.

Run through the installed console script in a subprocess, as a user runs it, so that nothing a
malicious file might do could hide behind the test process's state.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from console import one_line, run_deltafix, tensor_digests
from safetensors.torch import load_file


class Payload:
    """Unpickling this calls ``builtins.exec`` on code that writes ``marker``: what a hostile
    checkpoint does. A weights-only load must refuse it before the call."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def deltafix(tmp: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """The console script with its own empty TMPDIR, ``tmp``: where it stages the converted copy."""
    return run_deltafix(*args, tmpdir=tmp, timeout=600)


def as_pickle(src: Path, dst: Path, shards: int = 1) -> Path:
    """A copy of the safetensors checkpoint ``src`` with its weights saved by ``torch.save`` instead
    (one ``pytorch_model.bin``, or ``shards`` files and their index)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    state = load_file(str(src / "model.safetensors"))
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in names[i::shards]}, dst / file)
        weight_map.update({n: file for n in names[i::shards]})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def repair(trio: dict[str, Path], finetuned: Path, out: Path,
           *flags: str) -> subprocess.CompletedProcess[str]:
    """RESTA with --unaligned P: a full repair that needs no calibration data."""
    return deltafix(out.parent / "tmp", "repair", "--base", trio["A"], "--finetuned", finetuned, "--out", out, "--method", "resta",
                    "--unaligned", trio["P"], "--device", "cpu", *flags)


@pytest.mark.parametrize("shards", [1, pytest.param(2, marks=pytest.mark.heavy)])
def test_pickle_input_repairs_bit_for_bit_like_safetensors(trio: dict[str, Path], tmp_path: Path,
                                                           shards: int) -> None:
    pickled = as_pickle(trio["F"], tmp_path / "F_bin", shards)
    ran = repair(trio, pickled, tmp_path / "R_bin", "--allow-pickle")
    assert ran.returncode == 0, ran.stderr
    reference = repair(trio, trio["F"], tmp_path / "R_st")
    assert reference.returncode == 0, reference.stderr
    ours, theirs = load_file(str(tmp_path / "R_bin" / "model.safetensors")), \
        load_file(str(tmp_path / "R_st" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(ours[n].dtype == theirs[n].dtype and torch.equal(ours[n].view(torch.uint8), theirs[n].view(torch.uint8))
               for n in ours)
    if shards == 1:  # sharded input is read shard by shard, so the output lists its tensors in another order
        assert (tmp_path / "R_bin" / "model.safetensors").read_bytes() == \
            (tmp_path / "R_st" / "model.safetensors").read_bytes()
    record = json.loads((tmp_path / "R_bin" / "deltafix_report.json").read_text())["inputs"]["finetuned"]
    bins = sorted(p.name for p in pickled.glob("*.bin"))
    assert record["converted_from_pickle"] == bins
    assert not list((tmp_path / "tmp").iterdir())  # the converted copy is gone


def test_code_in_a_pickle_never_runs(trio: dict[str, Path], tmp_path: Path) -> None:
    hostile = as_pickle(trio["F"], tmp_path / "F_bin")
    marker = tmp_path / "pwned"
    state = load_file(str(trio["F"] / "model.safetensors"))
    torch.save({**state, "model.norm.weight": Payload(marker)}, hostile / "pytorch_model.bin")
    ran = repair(trio, hostile, tmp_path / "R", "--allow-pickle")
    assert ran.returncode == 2
    line = one_line(ran.stderr)
    assert "pytorch_model.bin" in line and "refused: it holds objects other than tensors" in line
    assert not marker.exists() and not (tmp_path / "R").exists()
    assert not list((tmp_path / "tmp").iterdir())


def test_non_tensor_entries_are_refused(trio: dict[str, Path], tmp_path: Path) -> None:
    odd = as_pickle(trio["F"], tmp_path / "F_bin")
    torch.save({**load_file(str(trio["F"] / "model.safetensors")), "step": 7}, odd / "pytorch_model.bin")
    ran = repair(trio, odd, tmp_path / "R", "--allow-pickle")
    assert ran.returncode == 2
    assert "refused: it holds objects other than tensors" in one_line(ran.stderr)


def test_pickle_is_refused_without_the_flag(trio: dict[str, Path], tmp_path: Path) -> None:
    pickled = as_pickle(trio["F"], tmp_path / "F_bin")
    ran = repair(trio, pickled, tmp_path / "R")
    assert ran.returncode == 2
    line = one_line(ran.stderr)
    assert "--allow-pickle" in line and "never runs code" in line
    assert not (tmp_path / "R").exists()


def adapter_as_pickle(src: Path, dst: Path) -> Path:
    """A copy of the PEFT adapter folder ``src`` with ``adapter_model.bin`` instead of safetensors."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(str(src / "adapter_model.safetensors")), dst / "adapter_model.bin")
    return dst


@pytest.fixture
def lora(trio: dict[str, Path], tmp_path: Path) -> Path:
    from peft import LoraConfig
    from peft_models import save_adapter

    return save_adapter(trio["A"], tmp_path / "lora", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


def test_pickle_adapter_repairs_like_its_safetensors_twin(trio: dict[str, Path], lora: Path, tmp_path: Path) -> None:
    pickled = adapter_as_pickle(lora, tmp_path / "lora_bin")
    refused = repair(trio, pickled, tmp_path / "R_no")
    assert refused.returncode == 2
    assert "adapter_model.bin" in (line := one_line(refused.stderr)) and "--allow-pickle" in line
    ran = repair(trio, pickled, tmp_path / "R_bin", "--allow-pickle")
    assert ran.returncode == 0, ran.stderr
    assert repair(trio, lora, tmp_path / "R_st").returncode == 0
    assert tensor_digests(tmp_path / "R_bin") == tensor_digests(tmp_path / "R_st")
    report = json.loads((tmp_path / "R_bin" / "deltafix_report.json").read_text())
    assert report["inputs"]["finetuned"]["converted_from_pickle"] == ["adapter_model.bin"]
    assert not list((tmp_path / "tmp").iterdir())


def test_rerun_from_the_recipe_reads_pickle_again(trio: dict[str, Path], tmp_path: Path) -> None:
    pickled = as_pickle(trio["F"], tmp_path / "F_bin")
    assert repair(trio, pickled, tmp_path / "R", "--allow-pickle").returncode == 0
    recipe = tmp_path / "R" / "deltafix_recipe.yaml"
    assert "allow_pickle: true" in recipe.read_text()
    rerun = deltafix(tmp_path / "tmp", "repair", "--recipe", recipe, "--out", tmp_path / "R2")
    assert rerun.returncode == 0, rerun.stderr
    assert tensor_digests(tmp_path / "R2") == tensor_digests(tmp_path / "R")


def test_inspect_reads_pickle_only_when_allowed(trio: dict[str, Path], lora: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A pickle base and a pickle adapter: the same rows as their safetensors twins (in process: the
    console script's refusal of pickles is tested above)."""
    from deltafix.cli import main

    base, adapter = as_pickle(trio["A"], tmp_path / "A_bin"), adapter_as_pickle(lora, tmp_path / "lora_bin")
    assert main(["inspect", "--base", str(trio["A"]), "--finetuned", str(adapter)]) == 2
    assert "--allow-pickle" in one_line(capsys.readouterr().err)
    assert main(["inspect", "--base", str(base), "--finetuned", str(adapter), "--allow-pickle", "--json"]) == 0
    ran = json.loads(capsys.readouterr().out)
    assert main(["inspect", "--base", str(trio["A"]), "--finetuned", str(lora), "--json"]) == 0
    assert ran == json.loads(capsys.readouterr().out)
    assert any(row["delta_norm"] > 0 for row in ran["tensors"])


def test_merge_lora_reads_pickle_adapters_when_allowed(trio: dict[str, Path], lora: Path, tmp_path: Path) -> None:
    from peft import LoraConfig
    from peft_models import save_adapter

    reinforce = save_adapter(trio["A"], tmp_path / "reinforce", LoraConfig(r=2, lora_alpha=4,
                                                                         target_modules=["q_proj", "o_proj"]), seed=2)
    pickled = adapter_as_pickle(reinforce, tmp_path / "reinforce_bin")
    from deltafix import api

    api.merge_lora(as_pickle(trio["A"], tmp_path / "A_bin"), lora, pickled, tmp_path / "M_bin",
                   allow_pickle=True)  # a pickle base as well
    api.merge_lora(trio["A"], lora, reinforce, tmp_path / "M_st")
    assert tensor_digests(tmp_path / "M_bin") == tensor_digests(tmp_path / "M_st")
