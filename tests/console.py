"""The installed ``deltafix`` console script as the tests run it, and what they check of its output.

Tests that run the script in a subprocess see what a user sees: the entry point, exit codes and
stderr, with nothing of the test process's state (threads, patches, imported modules) leaking in.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

DELTAFIX = shutil.which("deltafix")


def run_deltafix(*args: str | Path, env: Mapping[str, str] | None = None, tmpdir: Path | None = None,
                 cwd: Path | None = None, timeout: float = 300,
                 preexec_fn: Callable[[], object] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``deltafix *args`` with text output captured. ``env`` is set over this process's
    environment; ``tmpdir`` (made if missing) becomes the child's TMPDIR, where it stages copies."""
    assert DELTAFIX is not None, "the deltafix console script is not installed"
    child_env = {**os.environ, **(env or {})}
    if tmpdir is not None:
        tmpdir.mkdir(exist_ok=True)
        child_env["TMPDIR"] = str(tmpdir)
    return subprocess.run([DELTAFIX, *map(str, args)], capture_output=True, text=True, env=child_env, cwd=cwd,
                          timeout=timeout, preexec_fn=preexec_fn, check=False)


def one_line(stderr: str) -> str:
    """The single stderr line of a refusal (progress bars aside), asserting there is exactly one."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in stderr
    return lines[0]


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The ``error: ...`` line of a run that exited 2, asserting it is all that reached stderr."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def tensor_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every tensor (dtype, shape and bytes) in ``folder``'s safetensors files, by name.
    Compare these, never raw bytes: a failing comparison then prints names, not megabytes (pytest's
    diff of large byte strings hangs)."""
    found: dict[str, str] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            for name in fh.keys():
                tensor = fh.get_tensor(name).contiguous()
                raw = tensor.view(-1).view(torch.uint8).numpy().tobytes()
                found[name] = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode() + raw).hexdigest()
    return found


def folder_digest(*folders: Path) -> str:
    """One hash over every file's relative path and bytes under ``folders`` (links followed): the
    before/after check that a run left its inputs byte-identical."""
    h = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()
