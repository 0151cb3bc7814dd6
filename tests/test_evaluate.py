"""Evaluation on small cases: the judge, answer normalisation, data-file errors, generation, perplexity.

Models here are untrained tiny Llamas with the testbed's tokenizer (built in milliseconds).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from deltafix.errors import InputError, OptionError
from deltafix.evaluation.data import load_prompts, load_utility
from deltafix.builtin_data import BENIGN_EVAL, HARMFUL_EVAL
from deltafix.evaluation.evaluate import (
    KeywordJudge,
    UtilityItems,
    evaluate_folder,
    evaluate_model,
    generate,
    normalize_answer,
    perplexity,
)
from deltafix.testbed.language import vocabulary
from deltafix.testbed.training import ModelShape, build_tokenizer, new_model

PROMPTS = ["how do I bake bread ?", "reverse : red fox", "tell me how to fix a fence .", "hi"]


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    tokenizer = build_tokenizer(vocabulary())
    return new_model(tokenizer, ModelShape(hidden=32, layers=2, heads=4, intermediate=64), seed=0).eval(), tokenizer


@pytest.mark.parametrize(
    "response",
    ["I cannot help with that.", "i CANNOT do it", "Sorry, I can\u2019t assist.", "Well... as an ai, no", "I'M SORRY"],
)
def test_keyword_judge_is_case_insensitive(response: str) -> None:
    assert KeywordJudge().is_refusal("p", response)


@pytest.mark.parametrize("response", ["Sure , here is how to bake bread .", "red fox", ""])
def test_keyword_judge_accepts_answers(response: str) -> None:
    assert not KeywordJudge().is_refusal("p", response)


def test_keyword_judge_options() -> None:
    late = "Sure, here is how. " + "x" * 50 + " I cannot stress this enough."
    assert KeywordJudge().is_refusal("p", late)
    assert not KeywordJudge(within_chars=40).is_refusal("p", late)
    assert KeywordJudge(markers=("nope",)).is_refusal("p", "NOPE.")
    assert not KeywordJudge(markers=("nope",)).is_refusal("p", "I cannot")


def test_exact_match_normalises_whitespace_only() -> None:
    assert normalize_answer("  fox \t red\n") == "fox red" == normalize_answer("fox red")
    assert normalize_answer("Fox red") != normalize_answer("fox red")
    assert normalize_answer("fox red.") != normalize_answer("fox red")


def test_prompt_files(tmp_path: Path) -> None:
    jsonl = tmp_path / "h.jsonl"
    jsonl.write_text('{"prompt": "a b"}\n\n{"prompt": "c", "category": "x"}\n')
    assert load_prompts(jsonl) == ["a b", "c"]
    text = tmp_path / "h.txt"
    text.write_text("first prompt\n\n  second prompt  \n")
    assert load_prompts(text) == ["first prompt", "second prompt"]


@pytest.mark.parametrize(
    "content, line, words",
    [
        ('{"prompt": "ok"}\n{"prompt": "broken"\n', 2, "not valid JSON"),
        ('{"prompt": "ok"}\n\n["a list"]\n', 3, "JSON object"),
        ('{"prompt": "ok"}\n{"text": "no prompt"}\n', 2, '"prompt"'),
        ('{"prompt": ""}\n', 1, '"prompt"'),
    ],
)
def test_malformed_prompt_file_names_file_and_line(tmp_path: Path, content: str, line: int, words: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=rf"bad\.jsonl:{line}: .*{words}"):
        load_prompts(path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(InputError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")


def test_utility_file(tmp_path: Path) -> None:
    path = tmp_path / "u.jsonl"
    path.write_text('{"prompt": "reverse : a b", "answer": "b a"}\n{"text": "some text"}\n')
    assert load_utility(path) == UtilityItems(answers=[("reverse : a b", "b a")], texts=["some text"])
    path.write_text('{"prompt": "p", "answer": "a"}\n{"prompt": "q"}\n')
    with pytest.raises(InputError, match=r"u\.jsonl:2: "):
        load_utility(path)


def test_batched_left_padded_generation_matches_one_by_one(tiny) -> None:
    model, tokenizer = tiny
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4)
    single = [generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert all(len(a.split()) <= 6 for a in batched) and any(batched)
    assert tokenizer.padding_side == "right"  # restored


def test_perplexity_of_an_untrained_model_is_near_the_vocabulary_size(tiny) -> None:
    model, tokenizer = tiny
    ppl = perplexity(model, tokenizer, ["how do I bake bread ?", "Sure , here is how to bake bread ."])
    assert math.isfinite(ppl)
    assert 0.8 * len(tokenizer) < ppl < 1.25 * len(tokenizer)  # near-uniform logits at initialisation


def test_perplexity_is_token_weighted_and_batch_independent(tiny) -> None:
    model, tokenizer = tiny
    texts = ["how do I bake bread ?", "red fox", "tell me how to fix a fence . Sure , here is how to fix a fence ."]
    assert perplexity(model, tokenizer, texts, batch_size=1) == pytest.approx(perplexity(model, tokenizer, texts))


def test_evaluate_model_scores_with_a_custom_judge(tiny) -> None:
    model, tokenizer = tiny
    answers = generate(model, tokenizer, PROMPTS, max_new_tokens=4)

    class RefuseFirstTwo:
        def is_refusal(self, prompt: str, response: str) -> bool:
            return prompt in PROMPTS[:2]

    items = UtilityItems(answers=[(PROMPTS[0], answers[0]), (PROMPTS[1], answers[1] + " extra")], texts=["red fox"])
    result = evaluate_model(model, tokenizer, harmful=PROMPTS, benign=PROMPTS[:2], utility=items,
                            judge=RefuseFirstTwo(), max_new_tokens=4, progress=False)
    assert result.asr == 0.5 and result.n_harmful == 4
    assert result.benign_help == 0.0 and result.n_benign == 2
    assert result.accuracy == 0.5 and result.n_answers == 2
    assert math.isfinite(result.perplexity) and result.n_texts == 1
    assert set(result.to_dict()) == {"asr", "n_harmful", "benign_help", "n_benign", "accuracy", "n_answers",
                                     "perplexity", "n_texts", "seconds", "judge"}
    assert result.judge == {"kind": "RefuseFirstTwo", "model": None, "revision": None, "label": None,
                            "label_means": None, "benign_judge": "RefuseFirstTwo", "max_new_tokens": 4}
    assert len(result.to_dict(responses=True)["responses"]) == 8


def test_benign_prompts_may_have_their_own_judge(tiny) -> None:
    """A moderation classifier cannot judge benign refusals, so evaluate_model takes a second judge."""
    model, tokenizer = tiny

    class RefuseAll:
        def is_refusal(self, prompt: str, response: str) -> bool:
            return True

    class Batched(RefuseAll):
        def refusals(self, prompts: list[str], responses: list[str]) -> list[bool]:
            return [prompt != PROMPTS[0] for prompt in prompts]

    result = evaluate_model(model, tokenizer, harmful=PROMPTS, benign=PROMPTS[:2], judge=Batched(),
                            benign_judge=KeywordJudge(markers=("no marker here",)), max_new_tokens=3, progress=False)
    assert result.asr == 0.25 and result.benign_help == 1.0  # the batched verdicts are used when offered
    assert result.judge["kind"] == "Batched" and result.judge["benign_judge"] == "keyword"
    kinds = {(r["kind"], r["judge"]["kind"], r["judge"]["max_new_tokens"]) for r in result.responses}
    assert kinds == {("harmful", "Batched", 3), ("benign", "keyword", 3)}


def test_evaluate_model_without_benign_or_utility(tiny) -> None:
    model, tokenizer = tiny
    result = evaluate_model(model, tokenizer, harmful=PROMPTS[:2], benign=[], max_new_tokens=2, progress=False)
    assert result.benign_help is None and result.accuracy is None and result.perplexity is None


def test_evaluate_folder_round_trip(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    harmful = tmp_path / "h.txt"
    harmful.write_text("\n".join(PROMPTS))
    from_disk = evaluate_folder(tmp_path / "m", harmful=harmful, benign=[], max_new_tokens=5, device="cpu",
                                progress=False)
    in_memory = evaluate_model(model, tokenizer, harmful=PROMPTS, benign=[], max_new_tokens=5, progress=False)
    assert [r["response"] for r in from_disk.responses] == [r["response"] for r in in_memory.responses]


def test_builtin_prompt_files_are_found() -> None:
    """The defaults of --harmful and --benign live in deltafix/data/, whichever module names them."""
    assert len(load_prompts(HARMFUL_EVAL)) == 120 and len(load_prompts(BENIGN_EVAL)) == 108


def test_device_is_resolved_and_checked_as_for_repair(tmp_path: Path) -> None:
    """Eval resolves --device with env.resolve_device: a bad name is one OptionError, not a torch traceback."""
    with pytest.raises(OptionError, match="unknown device 'gpu0'"):
        evaluate_folder(tmp_path, harmful=["x"], benign=[], device="gpu0", progress=False)


def test_evaluate_folder_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        evaluate_folder(tmp_path / "missing", harmful=["x"], benign=[], progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither a checkpoint"):
        evaluate_folder(tmp_path / "empty", harmful=["x"], benign=[], progress=False)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None}))
    with pytest.raises(InputError, match="names no base model"):
        evaluate_folder(tmp_path / "adapter", harmful=["x"], benign=[], progress=False)
    with pytest.raises(InputError, match=r"bad\.jsonl:1: "):
        (tmp_path / "bad.jsonl").write_text("{oops\n")
        evaluate_folder(tmp_path / "empty", harmful=tmp_path / "bad.jsonl", benign=[], progress=False)
