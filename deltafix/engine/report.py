"""What every output folder says about how it was made: the report, the effective recipe and the
model card, written together so that OUT is reproducible on its own.

``repair`` and ``merge-lora`` share this envelope (version, command, method, parameters, inputs
with file hashes, output, per-module numbers, time, memory, platform); each adds its own keys.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from deltafix import __version__
from deltafix.engine.card import CARD_NAME, write_model_card

REPORT_NAME = "deltafix_report.json"
RECIPE_NAME = "deltafix_recipe.yaml"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far.

    Linux's ``VmHWM`` first: ``ru_maxrss`` survives ``exec``, so a repair started from a large
    parent (a test runner, a notebook) would report the parent's peak as its own. Elsewhere
    ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def input_record(ref: str, repo_id: str | None, revision: str | None, files: Mapping[str, str]) -> dict[str, Any]:
    """One input as the user named it, where it resolved to, and the SHA-256 of each weight file."""
    return {"ref": ref, "repo_id": repo_id, "revision": revision, "files": dict(files)}


def run_report(*, command: str, method: str, parameters: Mapping[str, Any], inputs: Mapping[str, Any],
               output: Mapping[str, Any], modules: Mapping[str, Any], started: float,
               **extra: Any) -> dict[str, Any]:
    """The shared envelope, with ``extra`` keys (notes, totals, ...) placed after ``output``."""
    return {
        "deltafix_version": __version__,
        "command": command,
        "method": method,
        "parameters": dict(parameters),
        "inputs": dict(inputs),
        "output": dict(output),
        **extra,
        "modules": dict(modules),
        "timings": {"total_seconds": time.perf_counter() - started},
        "peak_rss_bytes": peak_rss_bytes(),
        "platform": {"python": platform.python_version(), "torch": torch.__version__},
    }


def write_provenance(folder: Path, report: Mapping[str, Any], recipe: str, license_from: Path) -> None:
    """Report, effective recipe and model card into the staging ``folder`` of an output."""
    (folder / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    (folder / RECIPE_NAME).write_text(recipe)
    write_model_card(folder, report, license_from=license_from / CARD_NAME)
