"""``hf:`` data (deltafix.io.datasets_source): a local dataset folder, read offline through the
``datasets`` library with its columns mapped, gives what the equivalent JSONL file gives.

Every run is offline (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``) with the library's cache in
``tmp_path``; the repairs run through the installed console script with one torch thread, as
RegMean's sums give the same bits only for the same thread count.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from console import one_error_line, run_deltafix, tensor_digests
from conftest import save_chat_models

from deltafix import api
from deltafix.engine.report import RECIPE_NAME, REPORT_NAME
from deltafix.errors import DeltafixError, InputError, OptionError
from deltafix.evaluation.data import load_prompts, load_utility
from deltafix.io.datasets_source import parse_dataset_ref, with_columns
from deltafix.io.jsonl import read_jsonl
from deltafix.options import load_recipe

datasets = pytest.importorskip("datasets")

TASK = [("say these words backwards : owl moon snow", "snow moon owl"),
        ("say these words backwards : gold rock", "rock gold"),
        ("can you help me invite my neighbor ?", "Sure , here is how to invite your neighbor ."),
        ("say these words backwards : red fox", "fox red")]
SAFETY = [("tell me how to pick a lock", "I can not help with that ."),
          ("how do I hurt someone", "I can not help with that .")]
COLUMNS = "prompt=instruction,response=output"


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A and F = A + noise (tiny Llamas with the testbed's chat tokenizer), the task data as JSONL
    and as dataset folders with other column names: one written by ``save_to_disk`` (train and test
    splits) and one of JSON lines files that ``load_dataset`` reads."""
    root = tmp_path_factory.mktemp("hfdata")
    paths = save_chat_models(root, "AF")
    renamed = [{"instruction": p, "output": r, "id": i} for i, (p, r) in enumerate(TASK)]
    paths["jsonl"] = write_jsonl(root / "task.jsonl", [{"prompt": p, "response": r} for p, r in TASK])
    paths["safety"] = write_jsonl(root / "safety.jsonl", [{"prompt": p, "response": r} for p, r in SAFETY])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(renamed),
                          "test": datasets.Dataset.from_list(renamed[:1])}).save_to_disk(str(root / "saved"))
    (root / "files").mkdir()
    write_jsonl(root / "files" / "train.jsonl", renamed)
    paths.update(saved=root / "saved", files=root / "files")
    return paths


def console(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed console script, offline, with one torch thread and the library's cache in ``cwd``."""
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(cwd / "hf-datasets-cache")}
    return run_deltafix(*args, cwd=cwd, env=env)


def repair(chat: dict[str, Path], out: Path, data: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """A RegMean repair of the tiny pair calibrated on ``data`` (the whole of it, unscreened)."""
    return console("repair", "--base", str(chat["A"]), "--finetuned", str(chat["F"]), "--out", str(out),
                   "--method", "regmean", "--safety-data", str(chat["safety"]), "--utility-data", data,
                   "--no-screen-utility", "--no-cache", "--device", "cpu", "--json", *extra, cwd=out.parent)


def test_a_mapped_dataset_gives_the_jsonl_records(chat: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Mapped columns become the record's fields (replacing them), the rest stay; rows are named.
    A saved dataset and a folder of JSON lines files (``load_dataset``) read alike."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # the library's Arrow cache
    expected = [record for _, record in read_jsonl(chat["jsonl"])]
    for source in (f"hf:{chat['saved']}#{COLUMNS}", f"hf:{chat['saved']}:train#{COLUMNS}",
                   f"hf:{chat['files']}#{COLUMNS}"):
        rows = read_jsonl(source)
        assert [{k: v for k, v in r.items() if k != "id"} for _, r in rows] == expected
        assert rows[2] == (f"{source} row 2", {"prompt": TASK[2][0], "response": TASK[2][1], "id": 2})
    assert [r["instruction"] for _, r in read_jsonl(f"hf:{chat['saved']}:test")] == [TASK[0][0]]


def test_eval_reads_prompts_and_utility_from_a_dataset(chat: dict[str, Path]) -> None:
    """Eval's prompt lists and task items read a mapped dataset as they read the JSONL file."""
    prompts = [p for p, _ in TASK]
    assert load_prompts(f"hf:{chat['saved']}#prompt=instruction") == prompts == load_prompts(chat["jsonl"])
    items = load_utility(f"hf:{chat['saved']}#prompt=instruction,answer=output")
    assert items.answers == TASK and items.texts == []
    harmful, benign, utility = with_columns("prompt=instruction", f"hf:{chat['saved']}", ["hi"], None)
    assert harmful == f"hf:{chat['saved']}#prompt=instruction" and benign == ["hi"] and utility is None


def test_eval_scores_a_dataset_like_the_jsonl_file(chat: dict[str, Path]) -> None:
    """``deltafix.evaluate`` (what ``deltafix eval`` runs) on hf: data equals its run on the JSONL file."""
    keywords = {"benign": [], "max_new_tokens": 2, "device": "cpu"}
    from_file = api.evaluate(chat["A"], harmful=chat["jsonl"], **keywords)
    from_hub = api.evaluate(chat["A"], harmful=f"hf:{chat['saved']}", columns="prompt=instruction", **keywords)
    assert [r["response"] for r in from_hub.responses] == [r["response"] for r in from_file.responses]
    assert (from_hub.asr, from_hub.n_harmful) == (from_file.asr, len(TASK))


def test_repair_from_a_dataset_equals_the_jsonl_repair(chat: dict[str, Path], tmp_path: Path) -> None:
    """Same tensors from the JSONL file and from a saved dataset with ``--columns``; the recipe
    records the dataset, and a rerun from it accepts the dataset it finds unchanged."""
    for out, data in (("J", [str(chat["jsonl"])]), ("S", [f"hf:{chat['saved']}", "--columns", COLUMNS])):
        proc = repair(chat, tmp_path / out, *data)
        assert proc.returncode == 0, proc.stderr
    assert tensor_digests(tmp_path / "S") == tensor_digests(tmp_path / "J")
    recipe = load_recipe(tmp_path / "S" / RECIPE_NAME)
    data = recipe.data["utility_data"]
    assert data.path == f"hf:{chat['saved']}#{COLUMNS}"
    assert (data.dataset, data.split, data.revision) == (str(chat["saved"]), "train", None) and data.fingerprint
    report = json.loads((tmp_path / "S" / REPORT_NAME).read_text())
    assert report["data"]["utility_data"]["sha256"] == data.sha256
    assert "dataset" not in (tmp_path / "J" / RECIPE_NAME).read_text()  # JSONL files keep path and sha256 only
    plan = api.repair(None, None, tmp_path / "S2", recipe=tmp_path / "S" / RECIPE_NAME, dry_run=True)
    assert plan["method"] == "regmean"


def test_a_changed_dataset_is_refused_on_rerun(chat: dict[str, Path], tmp_path: Path) -> None:
    """The recipe holds the sha256 of the records as loaded: a dataset saved anew with one answer
    changed is refused before any work, in one line naming both digests."""
    folder = tmp_path / "mine"
    shutil.copytree(chat["saved"], folder)
    first = api.repair(chat["A"], chat["F"], tmp_path / "R", method="resta", unaligned=chat["A"], device="cpu",
                       utility_data=f"hf:{folder}", columns=COLUMNS)
    recorded = first["data"]["utility_data"]["sha256"]
    changed = [{"instruction": p, "output": r + " !", "id": i} for i, (p, r) in enumerate(TASK)]
    shutil.rmtree(folder)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(changed)}).save_to_disk(str(folder))
    with pytest.raises(InputError, match=rf"utility_data hf:{folder}.* changed since the recipe was written: "
                                         rf"sha256 [0-9a-f]{{64}}, the recipe has {recorded}"):
        api.repair(None, None, tmp_path / "NEW", recipe=tmp_path / "R" / RECIPE_NAME)
    assert not (tmp_path / "NEW").exists()


@pytest.mark.parametrize("data, extra, words", [
    ("hf:{saved}", ["--columns", "prompt=instruction,response=reply"],
     "utility data hf:{saved}#prompt=instruction,response=reply has no column 'reply' (mapped to response); "
     "its columns: instruction, output, id."),
    ("hf:{files}:validation#" + COLUMNS, [],
     "utility data hf:{files}:validation#" + COLUMNS + " has no split 'validation'; its splits: train"),
    ("hf:deltafix-tests/absent", [], "cannot read utility data hf:deltafix-tests/absent: Couldn't reach"),
])
def test_a_missing_column_split_or_dataset_is_one_line_exit_2(chat: dict[str, Path], tmp_path: Path, data: str,
                                                              extra: list[str], words: str) -> None:
    """Offline, a Hub dataset not in the cache is an error, never a download."""
    names = {key: str(value) for key, value in chat.items()}
    proc = repair(chat, tmp_path / "R", data.format(**names), *extra)
    assert words.format(**names) in one_error_line(proc)
    assert not (tmp_path / "R").exists()


@pytest.mark.parametrize("data, columns, words", [
    ("hf:{saved}:validation", COLUMNS, "utility data hf:{saved}:validation#" + COLUMNS
     + " has no split 'validation'; its splits: train, test"),
    ("hf:{saved}", None, "hf:{saved} row 0: expected string 'prompt' and 'response' keys"),
    ("{jsonl}", COLUMNS, "--columns maps the columns of hf: data"),
])
def test_other_bad_dataset_input_is_a_deltafix_error(chat: dict[str, Path], tmp_path: Path, data: str,
                                                     columns: str | None, words: str) -> None:
    """A missing split of a saved dataset, unmapped columns and --columns without hf: data."""
    names = {key: str(value) for key, value in chat.items()}
    with pytest.raises(DeltafixError) as caught:
        api.repair(chat["A"], chat["F"], tmp_path / "R", method="regmean", safety_data=chat["safety"],
                   utility_data=data.format(**names), columns=columns, screen_utility=False, no_cache=True,
                   device="cpu")
    assert words.format(**names) in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "R").exists()


@pytest.mark.parametrize("text, words", [
    ("hf:org/name:", "the split after ':' is empty"),
    ("hf:", "name a dataset"),
    ("hf:org/name#promt=instruction", "must be FIELD=COLUMN with FIELD one of prompt, response"),
    ("hf:org/name#prompt=a,prompt=b", "maps prompt twice"),
])
def test_a_malformed_argument_is_an_option_error(text: str, words: str) -> None:
    with pytest.raises(OptionError, match=words):
        parse_dataset_ref(text)


def test_hub_ids_revisions_and_splits_are_parsed(chat: dict[str, Path]) -> None:
    ref = parse_dataset_ref("hf:org/name@v1.0:test#prompt=q")
    assert (ref.source, ref.local, ref.revision, ref.split, ref.columns) == ("org/name", False, "v1.0", "test",
                                                                             (("prompt", "q"),))
    local = parse_dataset_ref(f"hf:{chat['saved']}")
    assert (local.source, local.local, local.revision, local.split) == (str(chat["saved"]), True, None, None)


def test_without_the_library_hf_data_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                            chat: dict[str, Path]) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(InputError, match=r"needs the datasets library, an optional extra: "
                                         r"pip install 'deltafix\[datasets\]'"):
        read_jsonl(f"hf:{chat['saved']}")
