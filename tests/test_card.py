"""The model card: built from the repair report, metadata by ModelCardData, round-trips through ModelCard.load."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard, ModelCardData

from deltafix.engine.card import card_license, model_card, write_model_card
from deltafix.cli import main
from deltafix.engine.report import REPORT_NAME


@pytest.fixture(scope="module")
def repaired(trio: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``deltafix repair`` of local folders (so every ref is local)."""
    out = tmp_path_factory.mktemp("card") / "R"
    args = ["repair", "--base", str(trio["A"]), "--finetuned", str(trio["F"]), "--unaligned", str(trio["P"]),
            "--out", str(out), "--method", "resta", "--set", "scale=0.7", "--json"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["deltafix", *args])  # as the console script sees it
        assert main() == 0
    return out


def hub_report(repaired: Path) -> dict[str, Any]:
    """The real report with its inputs renamed as if they had come from the Hub."""
    report = json.loads((repaired / REPORT_NAME).read_text())
    for role, name in (("aligned", "A"), ("finetuned", "F"), ("unaligned", "P")):
        report["inputs"][role].update(ref=f"org/{name}", repo_id=f"org/{name}", revision=name.lower() * 40)
    return report


def reload(card: ModelCard, tmp_path: Path) -> ModelCard:
    """Save and load back strictly; rebuilding ModelCardData from the dict re-runs its validation."""
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    ModelCardData(**loaded.data.to_dict())
    return loaded


def test_repair_writes_a_card_of_local_refs(repaired: Path, trio: dict[str, Path]) -> None:
    card = ModelCard.load(repaired / "README.md")
    data = card.data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data and "license" not in data
    assert data["tags"] == ["deltafix", "safety"] and data["library_name"] == "transformers"
    ModelCardData(**data)
    report = json.loads((repaired / REPORT_NAME).read_text())
    inputs = card.text.split("## Inputs")[1].split("## Method")[0]
    assert str(trio["A"].parent) not in inputs
    assert "| aligned base (A) | `A` | local folder |" in card.text
    assert "| scale | 0.7 |" in card.text and "`resta`" in card.text
    assert f"| delta norm after repair | {report['totals']['delta_norm_after']:.4g} |" in card.text
    assert report["command"].startswith("deltafix repair --base /") and report["command"] in card.text


def test_full_output_is_a_merge_of_a_and_f(repaired: Path, tmp_path: Path) -> None:
    card = reload(model_card(hub_report(repaired)), tmp_path)
    assert card.data.base_model == ["org/A", "org/F"]
    assert card.data.base_model_relation == "merge" and card.data.library_name == "transformers"
    assert "[`ffffffffffff`](https://huggingface.co/org/F/tree/" + "f" * 40 + ")" in card.text
    assert "| pre-alignment base (P) | [org/P](https://huggingface.co/org/P) |" in card.text
    assert "a full checkpoint" in card.text


def test_adapter_output_derives_from_a_only(repaired: Path, tmp_path: Path) -> None:
    card = reload(model_card(hub_report(repaired), adapter=True), tmp_path)
    assert card.data.base_model == "org/A"
    assert card.data.base_model_relation == "adapter" and card.data.library_name == "peft"
    assert "an adapter" in card.text


def test_adapter_folder_is_detected_when_writing(repaired: Path, tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    write_model_card(tmp_path, hub_report(repaired))
    assert ModelCard.load(tmp_path / "README.md").data.base_model_relation == "adapter"


def test_license_is_copied_from_the_finetunes_card(repaired: Path, tmp_path: Path) -> None:
    custom = tmp_path / "custom.md"
    custom.write_text("---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\ntags: [x]\n---\nhi\n")
    assert card_license(custom) == {"license": "other", "license_name": "tiny-license", "license_link": "LICENSE"}
    plain = tmp_path / "plain.md"
    plain.write_text("# a card without metadata\n")
    assert card_license(plain) == {} and card_license(tmp_path / "absent.md") == {}
    out = tmp_path / "out"
    out.mkdir()
    write_model_card(out, hub_report(repaired), license_from=custom)
    data = reload(ModelCard.load(out / "README.md"), tmp_path).data
    assert (data.license, data.license_name, data.license_link) == ("other", "tiny-license", "LICENSE")
    assert data.tags == ["deltafix", "safety"]


def test_gate_table_is_shown(repaired: Path, tmp_path: Path) -> None:
    report = hub_report(repaired)
    report["gate"] = {"passed": True, "table": {"asr": 0.02, "max_asr": 0.05, "judge": {"name": "a|b"}}}
    card = reload(model_card(report), tmp_path)
    assert "The gate passed." in card.text
    assert "| asr | 0.02 |" in card.text and "| judge.name | a\\|b |" in card.text
