"""End-to-end ``deltafix repair`` with RESTA on tiny real checkpoints, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from deltafix.cli import main
from deltafix.options import method_params
from deltafix.io.reader import CheckpointReader
from deltafix.engine.pipeline import RepairOptions, run_repair
from tests.conftest import write_sharded


def _repair(trio: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["repair", "--base", str(trio["A"]), "--finetuned", str(trio["F"]), "--unaligned", str(trio["P"]),
                 "--out", str(out), "--method", "resta", "--json", *extra])


def _all(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {n: reader.get(n) for n in reader.names}


def test_resta_output_matches_formula_and_loads(tmp_path: Path, trio: dict[str, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "R"
    assert _repair(trio, out, "--set", "scale=0.7") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "resta" and report["parameters"]["scale"] == 0.7
    a, f, p, r = (_all(x) for x in (trio["A"], trio["F"], trio["P"], out))
    assert set(r) == set(f)
    for name in f:
        expected = f[name] + 0.7 * (a[name] - p[name])
        torch.testing.assert_close(r[name], expected, rtol=1e-6, atol=1e-7)
    model = AutoModelForCausalLM.from_pretrained(out)
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 8)
    saved = json.loads((out / "deltafix_report.json").read_text())
    assert saved["inputs"]["finetuned"]["files"]["model.safetensors"]
    assert "scale: 0.7" in (out / "deltafix_recipe.yaml").read_text()
    assert (out / "config.json").exists()


def test_recipe_roundtrip_reproduces_bit_identical(tmp_path: Path, trio: dict[str, Path]) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    assert _repair(trio, first, "--set", "dare=0.3", "--set", "seed=5") == 0
    assert main(["repair", "--base", str(trio["A"]), "--finetuned", str(trio["F"]), "--unaligned",
                 str(trio["P"]), "--out", str(second), "--recipe", str(first / "deltafix_recipe.yaml")]) == 0
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_untouched_tensors_bit_identical_and_dtype_kept(tmp_path: Path, trio: dict[str, Path]) -> None:
    out = tmp_path / "R"
    assert _repair(trio, out, "--set", "scale=0") == 0
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(trio["F"] / "model.safetensors")).keys()
    for name, tensor in _all(trio["F"]).items():
        assert torch.equal(_all(out)[name], tensor)


def test_small_shard_size_gives_expected_layout(tmp_path: Path, trio: dict[str, Path]) -> None:
    """Through the library: the CLI refuses shards below 1MB, and the tiny model is smaller than that."""
    out = tmp_path / "R"
    f = CheckpointReader(trio["F"])
    largest = max(i.nbytes for i in f.tensors.values())
    run_repair(RepairOptions(base=str(trio["A"]), finetuned=str(trio["F"]), unaligned=str(trio["P"]), out=out,
                             method="resta", params=method_params("resta", {}, {}), shard_size=largest,
                             progress=False))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) == len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == f.total_bytes()
    assert all(f"-of-{len(files):05d}" in x.name for x in files)
    for file in files:
        assert all(index["weight_map"][n] == file.name for n in load_file(str(file)))
    assert sum(x.stat().st_size for x in files) >= f.total_bytes()
    assert set(index["weight_map"]) == set(f.names)


def test_three_shard_input_and_dry_run(tmp_path: Path, trio: dict[str, Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    sharded = {k: write_sharded(tmp_path / k, _all(trio[k]), 3) for k in ("A", "F", "P")}
    for k in sharded:
        (sharded[k] / "config.json").write_text((trio[k] / "config.json").read_text())
    out = tmp_path / "R"
    assert _repair(sharded, out, "--dry-run") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] and plan["tensors"] == len(_all(trio["F"])) and not out.exists()
    assert _repair(sharded, out) == 0
    plain = tmp_path / "plain"
    assert _repair(trio, plain) == 0
    for name, tensor in _all(plain).items():
        assert torch.equal(_all(out)[name], tensor)


def test_overwrite_replaces_atomically(tmp_path: Path, trio: dict[str, Path]) -> None:
    out = tmp_path / "R"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert _repair(trio, out) == 2
    assert (out / "old.txt").read_text() == "old"
    assert _repair(trio, out, "--overwrite") == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert not list(tmp_path.glob(".deltafix-*"))


def test_inspect_lists_changed_tensors(trio: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--base", str(trio["A"]), "--finetuned", str(trio["F"]), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["tensors"]
    assert rows[0]["name"].startswith("model.layers.0.")
    assert all(r["delta_norm"] > 0 for r in rows)
    assert main(["inspect", "--base", str(trio["A"]), "--finetuned", str(trio["F"])]) == 0
    assert "of" in capsys.readouterr().out


@pytest.mark.parametrize("kind, label", [(None, "pre-alignment base (P)"),
                                         ("harmful-finetune", "A fine-tuned on harmful data")])
def test_the_report_and_card_say_what_the_unaligned_model_is(tmp_path: Path, trio: dict[str, Path],
                                                             capsys: pytest.CaptureFixture[str], kind: str | None,
                                                             label: str) -> None:
    """RESTA's unaligned model is A fine-tuned on harmful data; the pre-alignment base also serves."""
    out = tmp_path / "R"
    assert _repair(trio, out, *(["--unaligned-kind", kind] if kind else [])) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"]["unaligned"]["kind"] == (kind or "base")
    assert label in (out / "README.md").read_text()


@pytest.mark.parametrize("extra, says", [(["--unaligned-kind", "pretrained"], "is not one of base, harmful-finetune"),
                                         (["--unaligned-kind", "base"], "pass --unaligned P too")])
def test_a_wrong_unaligned_kind_is_one_line(tmp_path: Path, trio: dict[str, Path],
                                            capsys: pytest.CaptureFixture[str], extra: list[str], says: str) -> None:
    args = ["repair", "--base", str(trio["A"]), "--finetuned", str(trio["F"]), "--out", str(tmp_path / "R"),
            "--method", "regmean", *extra]
    if "pretrained" in extra:
        args += ["--unaligned", str(trio["P"])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and not (tmp_path / "R").exists()
