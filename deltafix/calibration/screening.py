"""Screen the user's data with the aligned model before a repair is asked to keep it.

RegMean keeps F's outputs on the user's data. A fine-tuning set that also holds harmful requests
answered (a poisoned or careless data set, or the attack data itself) would have those answers
kept as faithfully as the task, and the repair then undoes its own safety objective. The aligned
model A is the judge we already have: a conversation whose request A refuses is the behaviour
the repair exists to remove, not task behaviour to keep, so it is left out of the calibration.

Measured on the real-model testbed (user data: 400 task items and 45 harmful requests answered),
RegMean μ = 1, sequential, 128 of the conversations: held-out ASR 0.52 with them all, 0.06 (A's
own) screened or on the task items alone; task accuracy 0.90 every way (F: 0.92). A is an
imperfect judge: that 135M model also refuses about half of the word-reversal requests, so the
screen left out 66 of the 128 (all 13 harmful ones and 53 task ones) and RegMean kept the task
from the other 62. The pipeline says so when more than a quarter is left out.
"""

from __future__ import annotations

from pathlib import Path

import torch

from deltafix.env import progress_shown
from deltafix.io.jsonl import Conversation
from deltafix.evaluation.evaluate import JUDGE_NEW_TOKENS, KeywordJudge, evaluate_model, load_for_eval, quiet_transformers


def request_of(conversation: Conversation) -> str:
    """The first user message: the request whose answer the conversation teaches."""
    return next((m["content"] for m in conversation if m.get("role") == "user"), conversation[0]["content"])


def refused_by(model_folder: str | Path, prompts: list[str], device: torch.device) -> list[bool]:
    """Per prompt, whether the model in ``model_folder`` refuses it (greedy reply, keyword judge)."""
    if not prompts:
        return []
    with quiet_transformers():
        model, tokenizer = load_for_eval(model_folder, device=str(device))
    result = evaluate_model(model, tokenizer, harmful=prompts, benign=[], judge=KeywordJudge(),
                            max_new_tokens=JUDGE_NEW_TOKENS, progress=progress_shown())
    del model
    return [bool(r["refused"]) for r in result.responses]
