"""What ``--judge`` and ``--max-new-tokens`` ask for, checked before any model loads, and the judges
they make: one for the harmful prompts, one for the benign prompts.

``--judge keyword`` (the default) needs nothing; ``--judge PATH_OR_HUB_ID`` is a text classifier
(``deltafix.evaluation.classifier``) with exactly one of ``--judge-refusal-label`` (a refusal
classifier: benign prompts are judged by it too) or ``--judge-unsafe-label`` (a moderation
classifier: it cannot see a refusal of a benign prompt, so those stay with the keyword judge).
A Hub id resolves like every model input (``deltafix.io.refs``): only that repo's safetensors,
configs and tokenizer files are fetched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deltafix.errors import OptionError
from deltafix.options import EVAL_BATCH_SIZE, EVAL_JUDGE, EVAL_NEW_TOKEN_PRESETS

if TYPE_CHECKING:
    from deltafix.evaluation.classifier import LabelMeaning
    from deltafix.evaluation.evaluate import RefusalJudge


def resolve_max_new_tokens(value: int | str) -> int:
    """``--max-new-tokens`` as a count: a positive integer (or its digits) or a preset name."""
    if isinstance(value, str) and value.strip().lower() in EVAL_NEW_TOKEN_PRESETS:
        return EVAL_NEW_TOKEN_PRESETS[value.strip().lower()]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    presets = ", ".join(f"{name} ({count})" for name, count in EVAL_NEW_TOKEN_PRESETS.items())
    raise OptionError(f"--max-new-tokens must be a whole number >= 1 or a preset: {presets}; got {value!r}.")


@dataclass(frozen=True)
class JudgeSpec:
    """The judge as the user named it: ``keyword``, or a classifier ref with the label it reads."""

    judge: str = EVAL_JUDGE
    refusal_label: str | None = None
    unsafe_label: str | None = None

    def __post_init__(self) -> None:
        labels = [flag for flag, value in (("--judge-refusal-label", self.refusal_label),
                                           ("--judge-unsafe-label", self.unsafe_label)) if value is not None]
        if not self.judge.strip():
            raise OptionError("--judge must be keyword or a text-classification model folder or Hub id.")
        if self.is_keyword and labels:
            raise OptionError(f"{labels[0]} names a classifier's label; pass the classifier with --judge too.")
        if not self.is_keyword and len(labels) != 1:
            raise OptionError(f"--judge {self.judge} needs exactly one of --judge-refusal-label (the label that "
                              "marks a refusal) or --judge-unsafe-label (the label that marks a harmful answer).")

    @property
    def is_keyword(self) -> bool:
        return self.judge == EVAL_JUDGE

    @property
    def label(self) -> tuple[str, LabelMeaning]:
        """The classifier's label and what it marks."""
        if self.refusal_label is not None:
            return self.refusal_label, "refusal"
        return str(self.unsafe_label), "unsafe"


@dataclass(frozen=True)
class Judges:
    """The judge of each kind of prompt (the same object when one judge serves both)."""

    harmful: RefusalJudge
    benign: RefusalJudge


def load_judges(spec: JudgeSpec, device: str, batch_size: int = EVAL_BATCH_SIZE) -> Judges:
    """Build the judges ``spec`` names; a classifier is resolved and loaded once, here."""
    from deltafix.evaluation.evaluate import KeywordJudge

    if spec.is_keyword:
        keyword = KeywordJudge()
        return Judges(keyword, keyword)
    from deltafix.evaluation.classifier import load_classifier_judge
    from deltafix.io.refs import resolve_ref

    label, means = spec.label
    classifier = load_classifier_judge(resolve_ref(spec.judge), label, means, device, batch_size)
    return Judges(classifier, classifier if means == "refusal" else KeywordJudge())


def describe(judge: Any) -> dict[str, Any]:
    """A judge as the report and the answers file name it: kind, model, revision, label, label_means."""
    record = {"kind": type(judge).__name__, "model": None, "revision": None, "label": None, "label_means": None}
    if hasattr(judge, "describe"):
        record.update(judge.describe())
    return record
