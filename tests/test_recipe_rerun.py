"""``deltafix repair --recipe OUT/deltafix_recipe.yaml --out NEW`` reruns a repair bit for bit.

The recipe written into OUT records the inputs (with each weight file's sha256), the data files
and the run options; a rerun with no other flag must give the same tensors and the same recipe,
and must refuse, in one stderr line and before writing anything, an input or data file whose
hash changed. Inputs are copied before any byte is changed: the session fixtures stay intact.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from huggingface_hub import constants
from console import one_error_line, run_deltafix, tensor_digests
from test_hub import add_to_cache, commit_sha

from deltafix import api
from deltafix.engine.report import RECIPE_NAME, REPORT_NAME
from deltafix.options import load_recipe

def console(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed console script, always with one torch thread: a repair that reduces in floating
    point (RegMean) gives the same bits only for the same thread count, and the test process's own
    count is whatever earlier tests left it at."""
    return run_deltafix(*args, cwd=cwd, env={"OMP_NUM_THREADS": "1"})


def rerun(recipe: Path, out: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``repair`` with only ``--recipe`` and ``--out`` (and ``extra``)."""
    return console("repair", "--recipe", str(recipe), "--out", str(out), "--json", *extra, cwd=cwd)


@pytest.fixture()
def copies(trio: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """Private copies of P, A and F (and a data file), which a test may change."""
    folders = {name: Path(shutil.copytree(path, tmp_path / "inputs" / name)) for name, path in trio.items()}
    data = tmp_path / "inputs" / "user.jsonl"
    data.write_text(json.dumps({"prompt": "add 2 and 3", "response": "5"}) + "\n")
    return {**folders, "data": data}


@pytest.fixture()
def first(copies: dict[str, Path], tmp_path: Path) -> Path:
    """A resta repair of the copies (absolute paths), with a data file given."""
    out = tmp_path / "R"
    api.repair(copies["A"], copies["F"], out, method="resta", unaligned=copies["P"], utility_data=copies["data"],
               device="cpu", scale=0.7)
    return out


def test_recipe_records_inputs_data_and_run(first: Path, copies: dict[str, Path]) -> None:
    recipe = load_recipe(first / RECIPE_NAME)
    report = json.loads((first / REPORT_NAME).read_text())
    assert recipe.method == "resta" and recipe.parameters["scale"] == 0.7
    assert recipe.inputs["base"].ref == str(copies["A"])
    assert recipe.inputs["finetuned"].files == report["inputs"]["finetuned"]["files"]
    assert recipe.inputs["unaligned"].files == report["inputs"]["unaligned"]["files"]
    assert recipe.data["utility_data"].path == str(copies["data"])
    assert report["data"]["utility_data"]["sha256"] == recipe.data["utility_data"].sha256
    assert recipe.run.device == "cpu" and recipe.run.unaligned_kind == "base" and recipe.run.as_full is False


def test_rerun_from_the_recipe_alone_is_bit_identical(first: Path, tmp_path: Path) -> None:
    proc = rerun(first / RECIPE_NAME, tmp_path / "NEW", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert tensor_digests(tmp_path / "NEW") == tensor_digests(first)
    assert (tmp_path / "NEW" / RECIPE_NAME).read_text() == (first / RECIPE_NAME).read_text()


def test_a_flag_overrides_the_recipe(first: Path, copies: dict[str, Path], tmp_path: Path) -> None:
    """A given flag wins: another F is read without its hash being checked against the recipe's."""
    report = api.repair(None, copies["A"], tmp_path / "NEW", recipe=first / RECIPE_NAME)
    assert report["inputs"]["finetuned"]["ref"] == str(copies["A"])
    assert report["parameters"]["scale"] == 0.7 and report["inputs"]["unaligned"]["ref"] == str(copies["P"])


@pytest.mark.parametrize("target", ["F", "P", "data"])
def test_a_changed_input_is_refused_in_one_line(first: Path, copies: dict[str, Path], tmp_path: Path,
                                                target: str) -> None:
    path = copies[target] / "model.safetensors" if target != "data" else copies["data"]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1  # the last byte of the last tensor (or of the data file's newline)
    path.write_bytes(bytes(raw))
    proc = rerun(first / RECIPE_NAME, tmp_path / "NEW", cwd=tmp_path)
    line = one_error_line(proc)
    old = (load_recipe(first / RECIPE_NAME).data["utility_data"].sha256 if target == "data" else
           load_recipe(first / RECIPE_NAME).inputs["finetuned" if target == "F" else "unaligned"].files[path.name])
    assert str(path) in line and old in line and "changed since the recipe was written" in line
    assert not (tmp_path / "NEW").exists() and proc.stdout == ""


def test_a_relative_input_that_no_longer_resolves_is_refused(copies: dict[str, Path], tmp_path: Path) -> None:
    work = copies["A"].parent
    out = work / "R"
    proc = run_deltafix("repair", "--base", "A", "--finetuned", "F", "--unaligned", "P", "--method", "resta",
                        "--out", "R", "--device", "cpu", "--json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load((out / RECIPE_NAME).read_text())["inputs"]["base"]["ref"] == "A"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    line = one_error_line(rerun(out / RECIPE_NAME, elsewhere / "NEW", cwd=elsewhere))
    assert "base input A does not resolve" in line and list(elsewhere.iterdir()) == []
    assert rerun(out / RECIPE_NAME, tmp_path / "NEW", cwd=work).returncode == 0


def test_hub_inputs_rerun_at_the_recorded_commit(trio: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub inputs are recorded with their commit and reread there; the recipe keeps the ref as given."""
    cache = tmp_path / "hf-cache"
    for name in "PAF":
        add_to_cache(cache, f"org/{name}", trio[name], commit_sha(name))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out, new = tmp_path / "R", tmp_path / "NEW"
    api.repair("org/A", "org/F", out, method="resta", unaligned="org/P", device="cpu")
    recipe = load_recipe(out / RECIPE_NAME)
    assert recipe.inputs["finetuned"].model_dump() == {
        "ref": "org/F", "repo_id": "org/F", "revision": commit_sha("F"),
        "files": {"model.safetensors": recipe.inputs["finetuned"].files["model.safetensors"]}}
    report = api.repair(None, None, new, recipe=out / RECIPE_NAME)
    assert report["inputs"]["finetuned"]["ref"] == f"org/F@{commit_sha('F')}"
    assert tensor_digests(new) == tensor_digests(out)
    assert (new / RECIPE_NAME).read_text() == (out / RECIPE_NAME).read_text()


@pytest.mark.slow
def test_rerun_of_a_calibrated_method_is_bit_identical(bed, tmp_path: Path) -> None:  # noqa: ANN001
    """RegMean reads the built-in safety set and the user's data: both are recorded and checked."""
    out = tmp_path / "R"
    data = Path(shutil.copy(bed.user_data, tmp_path / "user.jsonl"))
    made = console("repair", "--base", str(bed.aligned), "--finetuned", str(bed.finetuned), "--out", str(out),
                   "--method", "regmean", "--utility-data", str(data), "--utility-samples", "16", "--device", "cpu",
                   "--json", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    recipe = load_recipe(out / RECIPE_NAME)
    assert recipe.data["safety_data"].path == "builtin" and recipe.run.utility_samples == 16
    proc = rerun(out / RECIPE_NAME, tmp_path / "NEW", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert tensor_digests(tmp_path / "NEW") == tensor_digests(out)
    assert (tmp_path / "NEW" / RECIPE_NAME).read_text() == (out / RECIPE_NAME).read_text()
    data.write_text(data.read_text() + "\n")
    line = one_error_line(rerun(out / RECIPE_NAME, tmp_path / "NEW2", cwd=tmp_path))
    assert f"utility_data {data}" in line and recipe.data["utility_data"].sha256 in line
