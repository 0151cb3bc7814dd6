"""Long work shows progress on a terminal and nothing in piped logs (issue 18).

Calibration and the sequential solve run silently for many seconds on a real model; their bars go
to stderr only when stderr is a terminal and ``--json`` is off, so a CI log never fills with them.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios
from pathlib import Path

import pytest
from console import DELTAFIX, run_deltafix

pytestmark = [pytest.mark.slow, pytest.mark.skipif(DELTAFIX is None, reason="the deltafix console script is not installed")]


def _repair(bed, out: Path, cache: Path, *extra: str, terminal: bool) -> str:
    """Run a RegMean repair (calibration and the sequential solve) and return what reached stderr."""
    args = ["repair", "--base", str(bed.aligned), "--finetuned", str(bed.finetuned), "--out", str(out),
            "--method", "regmean", "--utility-data", str(bed.user_data), "--safety-data", str(bed.safety_data),
            "--set", "sequential=false", "--cache-dir", str(cache), "--device", "cpu", *extra]
    if not terminal:
        done = run_deltafix(*args)
        assert done.returncode == 0, done.stderr
        return done.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a fresh pty is 0 wide
    proc = subprocess.Popen([DELTAFIX, *args], stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes when the child exits
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=300) == 0
    return b"".join(chunks).decode(errors="replace")


def test_calibration_shows_a_bar_on_a_terminal_only(bed, tmp_path: Path) -> None:
    shown = _repair(bed, tmp_path / "R1", tmp_path / "h1", terminal=True)
    piped = _repair(bed, tmp_path / "R2", tmp_path / "h2", terminal=False)
    quiet = _repair(bed, tmp_path / "R3", tmp_path / "h3", "--json", terminal=True)
    assert "calibrate" in shown and "layer" in shown
    assert "calibrate" not in piped and "\r" not in piped
    assert "calibrate" not in quiet
