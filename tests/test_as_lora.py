"""``deltafix repair --as-lora RANK``: the repaired delta as a PEFT adapter on A (issue 18).

On the tiny Llama trio, with RESTA (no calibration data): the reported error falls with the rank
and vanishes at full rank, the adapter loads with PEFT on A and merges to A + B A, and the tensors
a LoRA cannot hold are listed and said once on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from deltafix.cli import main
from deltafix.engine.report import RECIPE_NAME, REPORT_NAME
from deltafix.io.lora import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME
from deltafix.io.reader import CheckpointReader
from deltafix.methods.lowrank import low_rank_factors
from deltafix.options import load_recipe

RANKS = (1, 4, 16)
FULL_RANK = 32
"""The tiny Llama's largest min(out, in) (hidden size 32): every Linear is then exact."""


def _repair(trio: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["repair", "--base", str(trio["A"]), "--finetuned", str(trio["F"]), "--unaligned", str(trio["P"]),
                 "--out", str(out), "--method", "resta", "--json", *extra])


@pytest.fixture(scope="module")
def outs(trio: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[int | None, Path]:
    """OUT per rank, and the full repaired checkpoint under None."""
    root = tmp_path_factory.mktemp("as_lora")
    folders: dict[int | None, Path] = {None: root / "full"}
    assert _repair(trio, folders[None]) == 0
    for rank in (*RANKS, FULL_RANK):
        folders[rank] = root / f"r{rank}"
        assert _repair(trio, folders[rank], "--as-lora", str(rank)) == 0
    return folders


def _report(folder: Path) -> dict:
    return json.loads((folder / REPORT_NAME).read_text())


def test_error_decreases_with_rank_and_vanishes_at_full_rank(outs: dict[int | None, Path]) -> None:
    totals = [_report(outs[rank])["totals"]["lora_relative_error"] for rank in RANKS]
    assert all(high > low for high, low in zip(totals, totals[1:])), totals
    assert 0 < totals[-1] < totals[0] <= 1
    full = _report(outs[FULL_RANK])
    assert full["totals"]["lora_relative_error"] < 1e-5
    assert max(m["lora_relative_error"] for m in full["modules"].values()) < 1e-5
    for name, module in _report(outs[RANKS[0]])["modules"].items():
        errors = [_report(outs[rank])["modules"][name]["lora_relative_error"] for rank in RANKS]
        assert errors[0] > errors[1] >= errors[2] >= 0, (name, errors)
        assert module["lora_rank"] == 1


def test_adapter_files_config_and_report(outs: dict[int | None, Path], trio: dict[str, Path]) -> None:
    out = outs[4]
    report = _report(out)
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == str(trio["A"]) and config["peft_type"] == "LORA"
    assert config["r"] == config["lora_alpha"] == 4
    linears = sorted(report["modules"])
    assert config["target_modules"] == [name.removesuffix(".weight") for name in linears]
    keys = set(load_file(out / WEIGHTS_NAME))
    assert keys == {f"{PEFT_PREFIX}{n.removesuffix('.weight')}.lora_{f}.weight" for n in linears for f in "AB"}
    assert not (out / "config.json").exists()  # an adapter folder, not a model
    output = report["output"]
    assert output["kind"] == "lora" and output["rank"] == 4
    assert output["files"] == sorted([CONFIG_NAME, WEIGHTS_NAME])  # the provenance is written after the report
    assert {REPORT_NAME, RECIPE_NAME, "README.md"} <= {p.name for p in out.iterdir()}
    # RESTA moves every tensor, so the norms, embeddings and LM head differ from A
    assert "model.norm.weight" in output["not_in_adapter"] and "lm_head.weight" in output["not_in_adapter"]
    assert not set(output["not_in_adapter"]) & set(linears)
    assert load_recipe(out / RECIPE_NAME).run.as_lora == 4


def test_adapter_loads_with_peft_and_merges_to_a_plus_ba(outs: dict[int | None, Path], trio: dict[str, Path]) -> None:
    out = outs[4]
    factors = load_file(out / WEIGHTS_NAME)
    aligned = CheckpointReader(trio["A"])
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trio["A"]), out).merge_and_unload()
    state = merged.state_dict()
    for name in _report(out)["modules"]:
        path = f"{PEFT_PREFIX}{name.removesuffix('.weight')}"
        expected = aligned.get(name) + factors[f"{path}.lora_B.weight"] @ factors[f"{path}.lora_A.weight"]
        torch.testing.assert_close(state[name], expected, rtol=0, atol=1e-6)
    assert torch.equal(state["model.norm.weight"], aligned.get("model.norm.weight"))


def test_full_rank_adapter_reproduces_the_full_repair(outs: dict[int | None, Path], trio: dict[str, Path]) -> None:
    full, aligned = CheckpointReader(outs[None]), CheckpointReader(trio["A"])
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trio["A"]),
                                       outs[FULL_RANK]).merge_and_unload().state_dict()
    for name in _report(outs[FULL_RANK])["modules"]:
        torch.testing.assert_close(merged[name], full.get(name), rtol=0, atol=1e-5)
        assert not torch.equal(full.get(name), aligned.get(name))


def test_low_rank_factors_are_the_truncated_svd() -> None:
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 8, generator=gen)
    A, B, error = low_rank_factors(delta, 3)
    assert A.shape == (3, 8) and B.shape == (12, 3)
    S = torch.linalg.svdvals(delta)
    assert error == pytest.approx(float((S[3:] ** 2).sum().sqrt() / (S ** 2).sum().sqrt()), rel=1e-5)
    A, B, error = low_rank_factors(delta, 100)  # capped at min(out, in): exact
    assert A.shape == (8, 8) and error < 1e-5
    assert low_rank_factors(torch.zeros(4, 4), 2)[2] == 0.0


def test_stderr_note_and_human_summary(tmp_path: Path, trio: dict[str, Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["repair", "--base", str(trio["A"]), "--finetuned", str(trio["F"]), "--unaligned", str(trio["P"]),
               "--out", str(tmp_path / "R"), "--method", "resta", "--as-lora", "2"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "rank-2 LoRA adapter" in captured.out
    notes = [line for line in captured.err.splitlines() if "--as-lora left" in line]
    assert len(notes) == 1 and "output.not_in_adapter" in notes[0]


@pytest.mark.parametrize("extra, message", [(("--as-lora", "0"), "--as-lora takes a rank of at least 1"),
                                            (("--as-lora", "4", "--as-full"), "pass one of them")])
def test_bad_as_lora_exits_2_in_one_line(tmp_path: Path, trio: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                         extra: tuple[str, ...], message: str) -> None:
    assert _repair(trio, tmp_path / "R", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "R").exists()


def test_dry_run_says_lora(tmp_path: Path, trio: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert _repair(trio, tmp_path / "R", "--as-lora", "4", "--dry-run") == 0
    assert json.loads(capsys.readouterr().out)["output_kind"] == "lora"
