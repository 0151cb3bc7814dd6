"""JSON from checkpoint files, parsed strictly: a downloaded checkpoint is untrusted input.

``json.loads`` keeps the last of two equal keys, so a crafted header or index could say one thing
to deltafix and another to a loader that keeps the first; it also recurses once per nesting
level, so a file of ten thousand ``[`` ends in a ``RecursionError`` (an internal error) instead
of a refusal. Both become an ``InputError`` naming the file here.
"""

from __future__ import annotations

import json
from typing import Any

from deltafix.errors import InputError


class _DuplicateKey(ValueError):
    """Raised inside the parser by ``_unique_pairs``; ``key`` is the repeated key."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses an object naming one key twice."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def parse_json(raw: str | bytes, where: object, remedy: str) -> Any:
    """Parse ``raw`` (the text of ``where``), refusing duplicate keys and runaway nesting.

    Every failure is one ``InputError`` line: ``where``, what is wrong, then ``remedy`` (a
    sentence saying what to do).
    """
    try:
        return json.loads(raw, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as err:
        raise InputError(f"{where} names the key {err.key!r} twice; {remedy}") from err
    except RecursionError as err:
        raise InputError(f"{where} is nested too deeply to be what it claims; {remedy}") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{where} is not valid JSON ({err}); {remedy}") from err


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def parse_json_object(raw: str | bytes, where: object, remedy: str) -> dict[str, Any]:
    """``parse_json`` for files whose top level must be an object (headers, indexes, configs)."""
    value = parse_json(raw, where, remedy)
    if not isinstance(value, dict):
        raise InputError(f"{where} holds a JSON {_JSON_TYPES.get(type(value), 'value')}, not an object; {remedy}")
    return value
