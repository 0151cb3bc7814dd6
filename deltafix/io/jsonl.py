"""JSONL data files: the one reader of every JSONL file deltafix takes (DESIGN §4).

Safety, utility and training data, eval and tune prompts all come through ``read_jsonl`` (or
``read_prompt_records`` for prompt lists, which also take plain text, one prompt a line), so a bad
line fails the same way whichever command reads it: one ``InputError`` naming ``file:line``. An
``hf:`` argument (``hf:org/name:train``) is read by ``deltafix.io.datasets_source`` instead and
gives the same records, named ``hf:... row N``.
The callers keep their own reading of the fields (``prompt``, ``messages``, ``answer``,
``category``...); a conversation is read by ``conversation_of``.

Conversation lines are ``{"prompt": str, "response": str}`` or ``{"messages": [{"role",
"content"}, ...]}`` (other keys, e.g. ``category``, are kept in the raw record and otherwise
ignored). In conversation data a blank line anywhere but at the end is refused: a silently
skipped record would change Hessians and training data without a word. Prompt lists skip blank
lines.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any, Iterator

from deltafix.errors import InputError
from deltafix.io.datasets_source import is_dataset_ref, read_dataset

Conversation = list[dict[str, str]]
Record = dict[str, Any]

JSONL_SUFFIXES = (".jsonl", ".json")
"""Prompt lists with these suffixes are JSONL; any other file is plain text, one prompt a line."""

_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def read_jsonl(path: str | Path, what: str = "data file", *, skip_blank: bool = False) -> list[tuple[str, Record]]:
    """``(file:line, object)`` for every record of a JSONL file; an empty file is an error.

    Trailing blank lines are ignored; other blank lines are skipped with ``skip_blank``, else refused.
    """
    if is_dataset_ref(path):
        return read_dataset(str(path), what)
    path = Path(path)
    records = [(where, _record(line, where)) for where, line in _lines(path, what, skip_blank)]
    if not records:
        raise InputError(f"{what} {path} holds no records.")
    return records


def read_prompt_records(path: str | Path, what: str = "prompt file") -> list[tuple[str, Record]]:
    """A prompt list's records: JSONL objects (``JSONL_SUFFIXES``), else each non-blank line as ``{"prompt": line}``.

    Plain-text lines are stripped; blank lines are skipped in both kinds; an empty list is an error.
    An ``hf:`` dataset's rows are records, as a JSONL file's lines are.
    """
    if is_dataset_ref(path):
        return read_dataset(str(path), what)
    path = Path(path)
    lines = _lines(path, what, skip_blank=True)
    if path.suffix in JSONL_SUFFIXES:
        records = [(where, _record(line, where)) for where, line in lines]
    else:
        records = [(where, {"prompt": line.strip()}) for where, line in lines]
    if not records:
        raise InputError(f"{what} {path} holds no prompts.")
    return records


def string_field(record: Record, key: str, where: str) -> str:
    """``record[key]`` when it is a non-empty string; anything else is an error naming ``file:line``."""
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f'{where}: expected a non-empty string "{key}"; got {json.dumps(record)[:80]}.')
    return value


def conversation_of(record: Record, where: str) -> Conversation:
    """Turn one JSONL record into a list of ``{"role", "content"}`` messages."""
    if "messages" in record:
        return _messages(record["messages"], where)
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise InputError(f"{where}: expected string 'prompt' and 'response' keys (or a 'messages' list).")
    if not prompt.strip() or not response.strip():
        raise InputError(f"{where}: 'prompt' and 'response' must not be empty.")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _messages(messages: Any, where: str) -> Conversation:
    """A ``messages`` list checked message by message (string role and content, not all empty)."""
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


def _lines(path: Path, what: str, skip_blank: bool) -> Iterator[tuple[str, str]]:
    """``(file:line, text)`` of each line but the trailing blank ones.

    Lines end at ``\\n`` only: ``str.splitlines`` also breaks at U+2028, U+0085 and the like,
    which JSON strings may hold unescaped (``json.dumps(..., ensure_ascii=False)`` writes them so).
    """
    text = _text(path, what).rstrip()
    for number, line in enumerate(text.split("\n") if text else [], start=1):
        where = f"{path}:{number}"
        if line.strip():
            yield where, line
        elif not skip_blank:
            raise InputError(f"{where}: empty line; each line must be one JSON record.")


def _text(path: Path, what: str) -> str:
    """The file as text; UTF-8 (a leading byte-order mark is dropped), a bad byte named by its line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise InputError(f"{what} {path} does not exist; check the path.") from err
    except OSError as err:
        raise InputError(f"cannot read {what} {path}: {err.strerror or err}.") from err
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 text ({err.reason}); save {what} {path.name} as UTF-8.") from err


def _record(line: str, where: str) -> Record:
    """One line parsed as a JSON object."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); fix or remove that line.") from err
    except RecursionError as err:
        raise InputError(f"{where}: not valid JSON (nested too deeply); fix or remove that line.") from err
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected a JSON object per line, got {_JSON_KINDS.get(type(value), 'a value')}.")
    return value
