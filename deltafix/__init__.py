"""deltafix: repair the safety of a fine-tuned LLM post hoc, from its weights."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deltafix")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
