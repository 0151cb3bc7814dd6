"""Evaluation data files: prompt lists and utility items, with errors that name ``file:line``.

- Prompts: JSONL ``{"prompt": str}`` (``.jsonl`` / ``.json`` files) or plain text, one per line.
- Utility: JSONL, each line ``{"prompt": str, "answer": str}`` (exact match) or ``{"text": str}``
  (perplexity); both kinds may be mixed in one file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

from deltafix.errors import InputError

PathLike = Union[str, Path]


@dataclass(frozen=True)
class UtilityItems:
    """Utility data: ``answers`` are (prompt, expected answer) pairs; ``texts`` are perplexity texts."""

    answers: list[tuple[str, str]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def read_jsonl(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line; errors name ``file:line``."""
    path = Path(path)
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or remove that line.") from err
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}.")
        yield lineno, obj


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"data file {path} does not exist; check the path.")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {path} as UTF-8 text ({err}).") from err


def _string_field(path: Path, lineno: int, obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f'{path}:{lineno}: expected a non-empty string "{key}"; got {json.dumps(obj)[:80]}.')
    return value


def load_prompts(path: PathLike) -> list[str]:
    """Prompts from JSONL ``{"prompt": ...}`` (``.jsonl``/``.json`` files) or plain text, one per line.

    Blank lines are skipped; an empty file is an error.
    """
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        prompts = [_string_field(path, n, obj, "prompt") for n, obj in read_jsonl(path)]
    else:
        prompts = [line.strip() for line in _read_lines(path) if line.strip()]
    if not prompts:
        raise InputError(f"{path} holds no prompts.")
    return prompts


def load_utility(path: PathLike) -> UtilityItems:
    """Utility items from JSONL: each line ``{"prompt", "answer"}`` (exact match) or ``{"text"}`` (perplexity)."""
    path = Path(path)
    items = UtilityItems()
    for lineno, obj in read_jsonl(path):
        if "text" in obj and "prompt" not in obj:
            items.texts.append(_string_field(path, lineno, obj, "text"))
        elif "prompt" in obj and "answer" in obj:
            answer = obj["answer"]
            if not isinstance(answer, str):
                raise InputError(f'{path}:{lineno}: "answer" must be a string.')
            items.answers.append((_string_field(path, lineno, obj, "prompt"), answer))
        else:
            raise InputError(f'{path}:{lineno}: expected {{"prompt", "answer"}} or {{"text"}}; got keys {sorted(obj)}.')
    if not items.answers and not items.texts:
        raise InputError(f"{path} holds no utility items.")
    return items
