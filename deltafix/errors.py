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
