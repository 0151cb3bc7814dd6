"""Non-weight files of F in OUT: custom code (``auto_map``), processor configs and license files are
copied byte for byte and never run; the report lists the code and the card says how to load it."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

import deltafix
from deltafix.cli import main
from deltafix.engine.report import REPORT_NAME
from deltafix.errors import InputError
from deltafix.io.assets import copy_assets

AUTO_MAP = {"AutoConfig": "org/other--configuration_other.OtherConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
EXTRA_FILES = {
    "modeling_custom.py": 'raise SystemExit("executed")\nfrom .custom_layers import Layer\n',
    "custom_layers.py": 'raise SystemExit("executed")\n',
    "LICENSE": "Custom licence terms.\n",
    "USE_POLICY.md": "Use it well.\n",
    "preprocessor_config.json": '{"processor_class": "CustomProcessor", "size": 7}\n',
    "processor_config.json": '{"processor_class": "CustomProcessor"}\n',
}


def _repair(trio: dict[str, Path], finetuned: Path, out: Path) -> int:
    return main(["repair", "--base", str(trio["A"]), "--finetuned", str(finetuned), "--unaligned", str(trio["P"]),
                 "--out", str(out), "--method", "resta"])


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def custom(trio: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of F whose config has an ``auto_map`` and whose folder holds code that exits if run."""
    folder = tmp_path / "F_custom"
    shutil.copytree(trio["F"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": AUTO_MAP}, indent=2))
    for name, text in EXTRA_FILES.items():
        (folder / name).write_text(text)
    return folder


def test_custom_code_is_copied_unrun_and_the_card_says_how_to_load(trio: dict[str, Path], custom: Path,
                                                                   tmp_path: Path) -> None:
    before = _digest(custom)
    out = tmp_path / "out"
    assert _repair(trio, custom, out) == 0
    assert _digest(custom) == before and not (custom / "__pycache__").exists()
    assert not any(name in sys.modules for name in ("modeling_custom", "custom_layers"))
    copied = _digest(out)
    for name in [*EXTRA_FILES, "generation_config.json"]:
        assert copied[name] == before[name], name
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["output"]["custom_code"] == {
        "auto_map": sorted(AUTO_MAP.values()), "files": ["custom_layers.py", "modeling_custom.py"],
        "other_repos": ["org/other"], "missing": [],
    }
    card = (out / "README.md").read_text()
    assert ("This model uses custom code (`auto_map`): load it with `trust_remote_code=True` after reviewing "
            "`custom_layers.py`, `modeling_custom.py`.") in card
    assert "`org/other`" in card


def test_a_model_without_auto_map_gets_no_custom_code_line(trio: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _repair(trio, trio["F"], out) == 0
    report = json.loads((out / REPORT_NAME).read_text())
    assert "custom_code" not in report["output"]
    assert "trust_remote_code" not in (out / "README.md").read_text()
    assert not list(out.glob("*.py"))


def test_a_license_linked_out_of_the_folder_is_refused(trio: dict[str, Path], custom: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub\n")
    (custom / "LICENSE").unlink()
    (custom / "LICENSE").symlink_to(secret)
    out = tmp_path / "out"
    assert _repair(trio, custom, out) == 2
    err = capsys.readouterr().err.strip()
    assert "links to a file that lies outside" in err and "\n" not in err and not out.exists()


def _folder(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_tokenizer_auto_map_pairs_missing_modules_and_unrelated_code(tmp_path: Path) -> None:
    """``[slow, null]`` pairs are read; a module auto_map names but the folder lacks is reported; a
    folder with ``*.py`` but no ``auto_map`` gets no code copied."""
    tokenizer = json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}})
    f = _folder(tmp_path / "F", {"config.json": "{}", "tokenizer_config.json": tokenizer})
    out = _folder(tmp_path / "out", {})
    assert copy_assets([f], out).report_entry()["custom_code"]["missing"] == ["tokenization_x.py"]
    plain = _folder(tmp_path / "plain", {"config.json": "{}", "train.py": "raise SystemExit(1)\n"})
    copied = copy_assets([plain], _folder(tmp_path / "out2", {}))
    assert copied.report_entry() == {} and "train.py" not in copied.names


def test_licenses_come_as_one_set_from_the_first_source(tmp_path: Path) -> None:
    f = _folder(tmp_path / "F", {"config.json": "{}", "licence.txt": "F's\n", "NOTICE": "F's notice\n"})
    a = _folder(tmp_path / "A", {"config.json": "{}", "LICENSE": "A's\n", "tokenizer.json": "{}"})
    out = _folder(tmp_path / "out", {})
    copied = copy_assets([f, a], out)
    assert sorted(p.name for p in out.iterdir()) == ["NOTICE", "config.json", "licence.txt", "tokenizer.json"]
    assert (out / "licence.txt").read_text() == "F's\n" and copied.code == []


def test_hub_snapshot_links_into_blobs_are_copied(tmp_path: Path) -> None:
    """A Hub cache snapshot links every file to ``../../blobs/<sha>``: that is inside, not out."""
    blobs = _folder(tmp_path / "models--o--m" / "blobs", {"b1": '{"auto_map": {"AutoModel": "modeling_m.M"}}',
                                                          "b2": "raise SystemExit(1)\n", "b3": "terms\n"})
    snapshot = tmp_path / "models--o--m" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for name, blob in (("config.json", "b1"), ("modeling_m.py", "b2"), ("LICENSE", "b3")):
        (snapshot / name).symlink_to(os.path.relpath(blobs / blob, snapshot))
    out = _folder(tmp_path / "out", {})
    copied = copy_assets([snapshot], out)
    assert copied.code == ["modeling_m.py"] and (out / "LICENSE").read_text() == "terms\n"
    assert not any(p.is_symlink() for p in out.iterdir())


def test_code_linked_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    f = _folder(tmp_path / "F", {"config.json": '{"auto_map": {"AutoModel": "modeling_m.M"}}'})
    (f / "modeling_m.py").symlink_to(_folder(tmp_path / "elsewhere", {"m.py": "x = 1\n"}) / "m.py")
    with pytest.raises(InputError, match="lies outside"):
        copy_assets([f], _folder(tmp_path / "out", {}))


def test_the_package_never_trusts_remote_code() -> None:
    """Custom code is data to deltafix: no call anywhere in the package may pass ``trust_remote_code``
    anything but a literal ``False`` (docs and messages may name it; calls may not)."""
    package = Path(deltafix.__file__).parent
    hits = [f"{path}:{node.lineno}" for path in package.rglob("*.py")
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code"
            and not (isinstance(node.value, ast.Constant) and node.value.value is False)]
    assert hits == []
