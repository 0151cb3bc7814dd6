"""deltafix: repair the safety of a fine-tuned LLM post hoc, from its weights.

``from deltafix import repair, merge_lora, evaluate, gate, push`` gives the Python API
(``deltafix.api``): one function per command that makes or judges a model.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("deltafix")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_API = ("repair", "merge_lora", "evaluate", "gate", "push")
"""The functions of ``deltafix.api`` that ``deltafix`` itself offers."""


def __getattr__(name: str) -> Any:
    """``deltafix.repair`` (and the other API functions) on first use: the API imports torch,
    which a bare ``import deltafix`` (for ``__version__``, say) does without."""
    if name in _API:
        from deltafix import api

        return getattr(api, name)
    raise AttributeError(f"module 'deltafix' has no attribute {name!r}")
