"""Evaluation data files: prompt lists and utility items. ``deltafix.io.jsonl`` reads them (its errors
name ``file:line``); this module says what their fields mean.

- Prompts: JSONL ``{"prompt": str}`` (``.jsonl`` / ``.json`` files) or plain text, one per line.
- Utility: JSONL, each line ``{"prompt": str, "answer": str}`` (exact match) or ``{"text": str}``
  (perplexity); both kinds may be mixed in one file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from deltafix.errors import InputError
from deltafix.io.jsonl import read_jsonl, read_prompt_records, string_field

PathLike = Union[str, Path]


@dataclass(frozen=True)
class UtilityItems:
    """Utility data: ``answers`` are (prompt, expected answer) pairs; ``texts`` are perplexity texts."""

    answers: list[tuple[str, str]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def load_prompts(path: PathLike) -> list[str]:
    """Prompts from JSONL ``{"prompt": ...}`` (``.jsonl``/``.json`` files) or plain text, one per line.

    Blank lines are skipped; an empty file is an error.
    """
    return [string_field(record, "prompt", where) for where, record in read_prompt_records(path)]


def load_utility(path: PathLike) -> UtilityItems:
    """Utility items from JSONL: each line ``{"prompt", "answer"}`` (exact match) or ``{"text"}`` (perplexity)."""
    items = UtilityItems()
    for where, record in read_jsonl(path, "utility file", skip_blank=True):
        if "text" in record and "prompt" not in record:
            items.texts.append(string_field(record, "text", where))
        elif "prompt" in record and "answer" in record:
            if not isinstance(record["answer"], str):
                raise InputError(f'{where}: "answer" must be a string.')
            items.answers.append((string_field(record, "prompt", where), record["answer"]))
        else:
            raise InputError(f'{where}: expected {{"prompt", "answer"}} or {{"text"}}; got keys {sorted(record)}.')
    return items
