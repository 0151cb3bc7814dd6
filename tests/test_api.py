"""The Python API (``from deltafix import repair``) against the command line: same output, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltafix.cli import main
from deltafix.errors import DeltafixError


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_api_equals_the_cli(trio: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deltafix import repair

    assert main(["repair", "--base", str(trio["A"]), "--finetuned", str(trio["F"]), "--unaligned", str(trio["P"]),
                 "--out", str(tmp_path / "cli"), "--method", "resta", "--set", "scale=0.7", "--json"]) == 0
    capsys.readouterr()
    report = repair(trio["A"], trio["F"], tmp_path / "api", method="resta", unaligned=trio["P"], scale=0.7)
    assert _weights(tmp_path / "api") == _weights(tmp_path / "cli") and _weights(tmp_path / "api")
    assert report == json.loads((tmp_path / "api" / "deltafix_report.json").read_text())
    assert report["parameters"]["scale"] == 0.7 and report["command"].startswith("deltafix.repair(")


def test_api_errors_are_deltafix_errors_with_the_clis_line(trio: dict[str, Path], tmp_path: Path) -> None:
    from deltafix import repair

    with pytest.raises(DeltafixError, match="^method resta: unknown parameter .nonsense."):
        repair(trio["A"], trio["F"], tmp_path / "R", method="resta", unaligned=trio["P"], nonsense=1)
    assert not (tmp_path / "R").exists()


@pytest.mark.slow
def test_api_default_method_follows_the_users_data(bed, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No method, the user's data given: regmean, as from the command line, to the same bytes."""
    from deltafix import repair

    report = repair(bed.aligned, bed.finetuned, tmp_path / "api", safety_data=bed.safety_data,
                    utility_data=bed.user_data, device="cpu")
    assert report["method"] == "regmean"
    assert not any("needs --utility-data" in note for note in report.get("notes", []))
    assert main(["repair", "--base", str(bed.aligned), "--finetuned", str(bed.finetuned), "--out",
                 str(tmp_path / "cli"), "--safety-data", str(bed.safety_data), "--utility-data", str(bed.user_data),
                 "--device", "cpu", "--json"]) == 0
    capsys.readouterr()
    assert _weights(tmp_path / "api") == _weights(tmp_path / "cli")


def test_the_screen_says_when_it_left_out_much(capsys: pytest.CaptureFixture[str]) -> None:
    """More than a quarter of the picked conversations screened out: one stderr line naming the way back."""
    import torch

    from deltafix.calibration.render import CalibrationSet
    from deltafix.engine.grams import Hessians
    from deltafix.engine.pipeline import _say_what_the_screen_left_out

    def data(kept: int, dropped: int) -> Hessians:
        samples = [torch.tensor([1, 2, 3])] * kept
        return Hessians(utility_set=CalibrationSet(samples, "u.jsonl", 512, available=100,
                                                   screened_out=tuple(range(1, dropped + 1))))

    _say_what_the_screen_left_out(data(kept=3, dropped=1))
    assert capsys.readouterr().err == ""
    _say_what_the_screen_left_out(data(kept=2, dropped=2))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "left out 2 of 4" in err[0] and "--no-screen-utility" in err[0]
