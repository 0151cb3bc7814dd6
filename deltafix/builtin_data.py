"""The data sets shipped in ``deltafix/data/`` (its README says what each holds and how it was made).

Paths only, so that a command can name or hash a built-in set before it imports transformers.
"""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SAFETY_CALIBRATION = DATA_DIR / "safety_calibration.jsonl"
"""Harmful requests with refusals: the default safety calibration set and SPARD's safety pool."""
HARMFUL_TUNE = DATA_DIR / "harmful_tune.jsonl"
"""The prompts ``auto`` knobs and ``--front`` score attack success on (never the eval prompts)."""
HARMFUL_EVAL = DATA_DIR / "harmful_eval.jsonl"
BENIGN_EVAL = DATA_DIR / "benign_eval.jsonl"
BENIGN_TRAIN = DATA_DIR / "benign_train.jsonl"
"""Helpful answers to everyday requests, for training only (mixed into ReinforceLoRA's data): their
topics are kept apart from ``benign_eval.jsonl`` so that a model trained on them is not scored on
what it learned."""
