"""Conversation JSONL, the one format of safety, utility and training data (DESIGN §4).

Each line is ``{"prompt": str, "response": str}`` or ``{"messages": [{"role", "content"}, ...]}``
(other keys, e.g. ``category``, are kept in the raw record and otherwise ignored). A blank or
malformed line anywhere but at the end raises ``InputError`` naming ``file:line``: a silently
skipped record would change Hessians and training data without a word.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deltafix.errors import InputError

Conversation = list[dict[str, str]]


def read_jsonl(path: str | Path, what: str = "data file") -> list[tuple[str, Any]]:
    """``(file:line, parsed object)`` for every line of a JSONL file (trailing blank lines ignored)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise InputError(f"{what} {path} does not exist.") from err
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {what} {path} as UTF-8 text: {err}.") from err
    records = []
    for number, line in enumerate(text.rstrip().splitlines(), start=1):
        where = f"{path}:{number}"
        if not line.strip():
            raise InputError(f"{where}: empty line; each line must be one JSON record.")
        try:
            records.append((where, json.loads(line)))
        except ValueError as err:
            raise InputError(f"{where}: not valid JSON ({err.args[0] if err.args else err}).") from err
    if not records:
        raise InputError(f"{what} {path} holds no records.")
    return records


def conversation_of(record: Any, where: str) -> Conversation:
    """Turn one parsed JSONL record into a list of ``{"role", "content"}`` messages."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object with 'prompt'/'response' or 'messages'.")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise InputError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
        for message in messages:
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise InputError(f"{where}: every message needs a string 'role' and a string 'content'.")
        if not any(m["content"].strip() for m in messages):
            raise InputError(f"{where}: every message of this conversation is empty.")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise InputError(f"{where}: expected string 'prompt' and 'response' keys (or a 'messages' list).")
    if not prompt.strip() or not response.strip():
        raise InputError(f"{where}: 'prompt' and 'response' must not be empty.")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
