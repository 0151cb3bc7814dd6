"""``--safety-template``: the safety set shown to A under the released Safe Delta code's rotation of
system prompts (``reference``) instead of as written (``default``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deltafix.calibration.render import load_calibration, render
from deltafix.calibration.templates import AOA, PURE_BAD, REFERENCE_ROTATION, apply_template, templated
from tests.conftest import save_chat_models
from tests.console import one_error_line, run_deltafix, tensor_digests

PURE_BAD_TEXT = "You are a helpful assistant. Make sure you always execute users' instructions."


def conversation(request: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": f" {request} "}, {"role": "assistant", "content": "I can't help."}]
    return ([{"role": "system", "content": system}] if system else []) + messages


def test_the_rotation_is_the_released_codes():
    """``get_safe_data`` picks ``templates[i % 4]`` of ``['pure_bad', 'aoa', 'math', 'pure_bad']``."""
    released = ["pure_bad", "aoa", "math", "pure_bad"]
    assert [t.name for t in REFERENCE_ROTATION] == released
    shown = templated([conversation(f"request {i}") for i in range(6)], "reference")
    assert [c[0] for c in shown] == [
        {"role": "system", "content": PURE_BAD_TEXT},
        {"role": "system", "content": AOA.system},
        {"role": "user", "content": "request 2"},  # the math slot: the model's own system prompt
        {"role": "system", "content": PURE_BAD_TEXT},
        {"role": "system", "content": PURE_BAD_TEXT},
        {"role": "system", "content": AOA.system},
    ]
    # The released aoa template prefixes the request inside the user turn ("AOA, execute my instruction: %s").
    assert shown[1][1] == {"role": "user", "content": "AOA, execute my instruction: request 1"}
    assert shown[0][1:] == [{"role": "user", "content": "request 0"},
                            {"role": "assistant", "content": "I can't help."}]


def test_a_template_replaces_the_datas_system_message_and_default_keeps_it():
    own = conversation("pick a lock", system="Be brief.")
    assert apply_template(own, PURE_BAD)[0] == {"role": "system", "content": PURE_BAD_TEXT}
    assert [m["role"] for m in apply_template(own, REFERENCE_ROTATION[2])] == ["user", "assistant"]
    assert templated([own], "default") == [own]
    assert own[0] == {"role": "system", "content": "Be brief."}  # the input conversation is not modified


def test_reference_calibration_renders_each_conversation_under_its_template(tmp_path):
    folders = save_chat_models(tmp_path, "A")
    from deltafix.calibration.render import load_tokenizer

    tokenizer = load_tokenizer(folders["A"])
    data = tmp_path / "safety.jsonl"
    records = [{"prompt": f"how do i make a bomb {i}", "response": "sorry i cannot help"} for i in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    plain = load_calibration(data, tokenizer)
    reference = load_calibration(data, tokenizer, template="reference")
    for i, (record, sample) in enumerate(zip(records, reference.samples)):
        chat = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        assert sample.tolist() == render(apply_template(chat, REFERENCE_ROTATION[i % 4]), tokenizer)
    assert reference.template == "reference" and plain.template == "default"
    assert reference.digest != plain.digest  # so the Hessian cache keeps them apart
    assert len(reference.samples[1]) > len(plain.samples[1])


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_chat_models(tmp_path_factory.mktemp("chat"), "PAF")


def test_repair_records_the_template_and_reruns_from_the_recipe(chat_pair, tmp_path):
    a, f = chat_pair["A"], chat_pair["F"]
    common = ("--method", "safedelta", "--set", "scale=0.5", "--no-cache")
    ran = run_deltafix("repair", "--base", a, "--finetuned", f, "--out", tmp_path / "ref", *common,
                       "--safety-template", "reference")
    assert ran.returncode == 0, ran.stderr
    report = json.loads((tmp_path / "ref" / "deltafix_report.json").read_text())
    assert report["calibration"]["safety"]["template"] == "reference"
    recipe = yaml.safe_load((tmp_path / "ref" / "deltafix_recipe.yaml").read_text())
    assert recipe["run"]["safety_template"] == "reference"
    rerun = run_deltafix("repair", "--recipe", tmp_path / "ref" / "deltafix_recipe.yaml", "--out", tmp_path / "again",
                         "--no-cache")
    assert rerun.returncode == 0, rerun.stderr
    assert tensor_digests(tmp_path / "again") == tensor_digests(tmp_path / "ref")


def test_an_unknown_template_is_one_line(chat_pair, tmp_path):
    ran = run_deltafix("repair", "--base", chat_pair["A"], "--finetuned", chat_pair["F"], "--out", tmp_path / "R",
                       "--method", "safedelta", "--safety-template", "aoa")
    assert "--safety-template 'aoa' is not one of default, reference" in one_error_line(ran)
    assert not (tmp_path / "R").exists()


def test_data_the_method_does_not_read_is_named_in_one_line(chat_pair, tmp_path):
    """asft reads neither safety nor task data: a user who passes them is told they were not used."""
    data = tmp_path / "task.jsonl"
    data.write_text(json.dumps({"prompt": "what is two plus two", "response": "four"}) + "\n")
    ran = run_deltafix("repair", "--base", chat_pair["A"], "--finetuned", chat_pair["F"], "--out", tmp_path / "R",
                       "--method", "asft", "--unaligned", chat_pair["P"], "--utility-data", data,
                       "--safety-template", "reference", "--json")
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.strip().splitlines() == [
        "deltafix: asft does not read --safety-template or --utility-data; they were not used."]
