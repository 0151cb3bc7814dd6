"""User-facing errors: each carries one sentence that says what went wrong and what to do.

The CLI prints ``str(err)`` on one line and exits with code 2; anything that is not a
``DeltafixError`` is an internal error (exit 3).
"""


class DeltafixError(Exception):
    """Base class of every error a user can cause (bad paths, bad files, bad options)."""


class InputError(DeltafixError):
    """An input checkpoint, adapter or data file is missing, unreadable or malformed."""


class MismatchError(DeltafixError):
    """Inputs do not fit together (tensor names, shapes, adapter targets)."""


class OutputError(DeltafixError):
    """The output location cannot be used (exists, lies inside an input, disk full)."""


class OptionError(DeltafixError):
    """A command-line option or recipe value is invalid."""


REASON_LIMIT = 300
"""Longest library text kept in a message; the rest of a long explanation is cut."""


def reason(err: BaseException) -> str:
    """A library exception as a clause for a ``DeltafixError`` message: its first line, no final period.

    transformers and peft raise multi-line messages that advise options deltafix does not have
    (``trust_remote_code=True``); the message a user sees must be one line that suggests only what
    deltafix offers, so custom-code refusals are restated and the rest is cut to its first line
    (with what follows when that line ends in a colon).
    """
    text = str(err)
    if "trust_remote_code" in text or "custom code" in text:
        return "the model needs custom Python code from its repository, which deltafix never runs"
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(err).__name__]
    if not lines[0].endswith(":"):
        return lines[0].rstrip(". ")
    joined = " ".join(lines)  # a first line that announces a list means nothing without it
    return (joined[:REASON_LIMIT] + "…") if len(joined) > REASON_LIMIT else joined.rstrip(". ")
