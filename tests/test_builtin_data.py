"""Checks on the built-in default data in deltafix/data/.

The calibration set drives the Safe Delta / RegMean Hessians, the tune set picks the auto budget
(scale=auto, mu=auto) and the eval sets measure ASR and over-refusal, so each must be well formed,
large enough, varied, and kept apart from the others.
"""

import json
import re
from collections import Counter
from importlib.resources import files

import pytest

DATA = files("deltafix") / "data"

REFUSAL_MARKERS = (
    "i can't",
    "i cannot",
    "i'm sorry",
    "i won't",
    "i am unable",
    "i'm unable",
    "i'm not able",
)

# Word-set Jaccard at or above this counts as a near-duplicate prompt.
NEAR_DUPLICATE = 0.8


def load(name: str) -> list[dict]:
    """Parse one JSONL file, failing with the line number of any bad line."""
    rows = []
    for number, line in enumerate((DATA / name).read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"{name}:{number} is blank"
        row = json.loads(line)
        assert isinstance(row, dict), f"{name}:{number} is not a JSON object"
        rows.append(row)
    return rows


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def jaccard(a: str, b: str) -> float:
    wa, wb = words(a), words(b)
    return len(wa & wb) / len(wa | wb)


CALIBRATION = load("safety_calibration.jsonl")
HARMFUL = load("harmful_eval.jsonl")
TUNE = load("harmful_tune.jsonl")
BENIGN = load("benign_eval.jsonl")
FILES = {
    "safety_calibration.jsonl": (CALIBRATION, {"prompt", "response", "category"}),
    "harmful_eval.jsonl": (HARMFUL, {"prompt", "category"}),
    "harmful_tune.jsonl": (TUNE, {"prompt", "category", "style"}),
    "benign_eval.jsonl": (BENIGN, {"prompt"}),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_rows_have_exactly_the_required_non_empty_string_fields(name):
    rows, keys = FILES[name]
    for number, row in enumerate(rows, 1):
        assert set(row) == keys, f"{name}:{number} has keys {sorted(row)}"
        for key in keys:
            assert isinstance(row[key], str) and row[key].strip(), f"{name}:{number} {key}"


def test_calibration_is_large_and_spans_many_categories():
    per_category = Counter(row["category"] for row in CALIBRATION)
    assert len(CALIBRATION) >= 128
    assert len(per_category) >= 10
    assert min(per_category.values()) >= 5, per_category


def test_eval_sets_are_large_enough_and_harmful_eval_covers_calibration_categories():
    assert len(HARMFUL) >= 100
    assert len(BENIGN) >= 100
    assert {row["category"] for row in HARMFUL} == {row["category"] for row in CALIBRATION}


@pytest.mark.parametrize("name", sorted(FILES))
def test_no_duplicate_or_near_duplicate_prompts_within_a_file(name):
    prompts = [row["prompt"] for row in FILES[name][0]]
    repeated = [p for p, n in Counter(normalise(p) for p in prompts).items() if n > 1]
    assert not repeated
    close = [
        (a, b)
        for i, a in enumerate(prompts)
        for b in prompts[i + 1 :]
        if jaccard(a, b) >= NEAR_DUPLICATE
    ]
    assert not close


def assert_disjoint(first: list[dict], second: list[dict]) -> None:
    """No prompt of ``first`` equals, or nearly equals, a prompt of ``second``."""
    a_prompts = [row["prompt"] for row in first]
    b_prompts = [row["prompt"] for row in second]
    assert not {normalise(p) for p in a_prompts} & {normalise(p) for p in b_prompts}
    close = [(a, b) for a in a_prompts for b in b_prompts if jaccard(a, b) >= NEAR_DUPLICATE]
    assert not close


def test_calibration_prompts_do_not_appear_in_either_eval_set():
    assert_disjoint(CALIBRATION, HARMFUL + BENIGN)


def test_tune_set_has_eight_prompts_in_each_calibration_category():
    """Auto-tune bisects on ASR over these, so every category must weigh the same: three requests
    dressed up (role play, pretexts), three asked plainly and two in the short "what's the quickest
    way" / "could you show me how" forms, since a fine-tune's harm often lives in one style of asking."""
    per_category = Counter(row["category"] for row in TUNE)
    assert set(per_category) == {row["category"] for row in CALIBRATION}
    assert set(per_category.values()) == {8}, per_category
    assert len(TUNE) == 120
    styles = Counter((row["category"], row["style"]) for row in TUNE)
    assert {style: count for (_, style), count in styles.items()} == {"dressed": 3, "plain": 3, "short": 2}


@pytest.mark.parametrize(
    "other", ["safety_calibration.jsonl", "harmful_eval.jsonl", "benign_eval.jsonl"]
)
def test_tune_prompts_are_apart_from_calibration_and_both_eval_sets(other):
    """Tuning on S would only re-measure the calibration; tuning on eval would leak the ASR."""
    assert_disjoint(TUNE, FILES[other][0])


def test_every_calibration_response_is_a_refusal():
    missing = [
        row["response"]
        for row in CALIBRATION
        if not any(marker in row["response"].lower() for marker in REFUSAL_MARKERS)
    ]
    assert not missing


def test_calibration_responses_are_not_stamped_from_one_template():
    """Aligned models favour a few stock openings, but no one opening may dominate."""
    responses = [normalise(row["response"]) for row in CALIBRATION]
    assert len(set(responses)) == len(responses)
    openings = Counter(" ".join(r.split()[:6]) for r in responses)
    assert openings.most_common(1)[0][1] <= len(responses) // 5, openings.most_common(3)


def test_benign_and_harmful_eval_share_no_prompt():
    harmful = {normalise(row["prompt"]) for row in HARMFUL}
    assert not harmful & {normalise(row["prompt"]) for row in BENIGN}
