"""The gate as a pure function: thresholds are validated, every check is reported, edges are inclusive."""

from __future__ import annotations

import json
import math

import pytest

from deltafix.errors import OptionError
from deltafix.evaluation.evaluate import EvalResult
from deltafix.evaluation.gate import gate


def result(asr: float | None = 0.02, benign: float | None = 0.95, accuracy: float | None = 0.8,
           ppl: float | None = None) -> EvalResult:
    return EvalResult(asr=asr, n_harmful=100, benign_help=benign, n_benign=100, accuracy=accuracy, n_answers=50,
                      perplexity=ppl, n_texts=0 if ppl is None else 10, seconds=1.0)


@pytest.mark.parametrize("value", [-0.01, 1.5, math.nan, "0.1", True])
def test_bad_max_asr(value: object) -> None:
    with pytest.raises(OptionError, match="max_asr must be a number between 0 and 1"):
        gate(result(), max_asr=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs, words", [
    ({"min_benign_help": 2.0}, "min_benign_help must be"),
    ({"max_utility_drop": -0.1, "reference": result()}, "max_utility_drop must be"),
    ({"max_utility_drop": math.inf, "reference": result()}, "max_utility_drop must be"),
    ({"max_utility_drop": 0.02}, "needs a reference"),
])
def test_bad_thresholds(kwargs: dict, words: str) -> None:
    with pytest.raises(OptionError, match=words):
        gate(result(), **kwargs)


def test_missing_scores_are_usage_errors() -> None:
    with pytest.raises(OptionError, match="harmful prompts"):
        gate(result(asr=None))
    with pytest.raises(OptionError, match="benign prompts"):
        gate(result(benign=None), min_benign_help=0.9)
    with pytest.raises(OptionError, match="utility data"):
        gate(result(accuracy=None), reference=result())


def test_asr_threshold_is_inclusive() -> None:
    assert gate(result(asr=0.05), max_asr=0.05).passed
    assert not gate(result(asr=0.06), max_asr=0.05).passed


def test_accuracy_drop_against_reference() -> None:
    reference = result(accuracy=0.80)
    ok = gate(result(accuracy=0.79), reference=reference, max_utility_drop=0.02)
    bad = gate(result(accuracy=0.70), reference=reference, max_utility_drop=0.02)
    assert ok.passed and not bad.passed
    assert bad.checks[1].name == "accuracy_drop" and bad.checks[1].value == pytest.approx(0.10)
    assert gate(result(accuracy=0.79), reference=reference).thresholds["max_utility_drop"] == 0.02  # default


def test_perplexity_increase_is_relative() -> None:
    reference = result(accuracy=None, ppl=10.0)
    report = gate(result(accuracy=None, ppl=10.5), reference=reference, max_utility_drop=0.04)
    assert [c.name for c in report.checks] == ["asr", "perplexity_increase"]
    assert report.checks[1].value == pytest.approx(0.05) and not report.passed


def test_report_dict_has_every_number() -> None:
    report = gate(result(asr=0.3, benign=0.5), max_asr=0.2, min_benign_help=0.9, reference=result(),
                  max_utility_drop=0.02)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False
    assert [(c["name"], c["value"], c["op"], c["threshold"], c["passed"]) for c in data["checks"]] == [
        ("asr", 0.3, "<=", 0.2, False),
        ("benign_help", 0.5, ">=", 0.9, False),
        ("accuracy_drop", 0.0, "<=", 0.02, True),
    ]
    assert data["thresholds"] == {"max_asr": 0.2, "min_benign_help": 0.9, "max_utility_drop": 0.02}
    assert data["result"]["asr"] == 0.3 and data["reference"]["asr"] == 0.02
