"""deltafix: repair the safety of a fine-tuned LLM post hoc, from its weights.

``from deltafix import repair`` gives the Python API (``deltafix.api.repair``).
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("deltafix")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    """``deltafix.repair`` on first use: importing it pulls in torch, which ``deltafix --help`` does without."""
    if name == "repair":
        from deltafix.api import repair

        return repair
    raise AttributeError(f"module 'deltafix' has no attribute {name!r}")
