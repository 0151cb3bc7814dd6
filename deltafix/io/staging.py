"""Staging folders named by their owner, so a later run can remove what a killed run left behind.

A run builds OUT in ``<parent of OUT>/.deltafix-tmp-<pid>-<host>-<random>`` and stages large
intermediates (RegMean's solved fp32 weights, uncached Hessians: about 4 bytes a parameter) in
``$TMPDIR/deltafix-stage-<pid>-<host>-<random>``. Every exception, Ctrl-C and SIGTERM included,
removes them, but SIGKILL or a power cut cannot. The owner's pid in the name lets the next run
tell a stale folder (its owner no longer runs) from one in use and remove it
(``remove_stale``). ``<host>`` is a short hash of the host name: on a folder shared between
machines a pid says nothing about another machine's processes, so those folders are left alone.

OUT itself is swapped in with two renames; the old OUT waits in
``.deltafix-old-<pid>-<host>-<random>/<name of OUT>`` between them. A run killed in that instant
leaves OUT missing, and ``remove_stale`` moves the old one back.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import socket
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from deltafix.errors import OutputError

TMP_PREFIX = ".deltafix-tmp-"
"""The output being built, beside OUT."""
OLD_PREFIX = ".deltafix-old-"
"""Holds the previous OUT while the new one is renamed into place, beside OUT."""
STAGE_PREFIX = "deltafix-stage-"
"""Large intermediates in the temporary folder."""


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


_held = 0
"""How many ``signals_deferred`` blocks the main thread is in."""
_pending: list[Callable[[], None]] = []
"""What a signal handler deferred while a block ran (``defer_if_held``)."""


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold the effect of SIGINT and SIGTERM back until the block ends; it happens right after.

    Creating a staging folder and arming its cleanup are two steps: a signal landing between
    them would leave the folder behind with nobody to remove it. Python runs signal handlers in
    the main thread between bytecodes, whichever thread the kernel delivered the signal to (the
    hashing threads included), so blocking the signal with ``pthread_sigmask`` in one thread is not
    enough; instead a handler that sees a block running (``defer_if_held``) leaves its action here,
    and the block runs it when it ends.
    """
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if _held == 0 and _pending:
            _pending.pop()()


def defer_if_held(action: Callable[[], None]) -> bool:
    """For a signal handler: inside ``signals_deferred``, keep ``action`` for the block's end and
    return True; elsewhere return False (the handler acts now)."""
    if _held == 0:
        return False
    _pending[:] = [action]
    return True


def make_staging(parent: Path, prefix: str) -> Path:
    """Create and return an empty ``parent/<prefix><pid>-<host>-<random>`` folder.

    It is made with ``mkdir(0o777)``, so the umask gives its mode (typically 0755) and OUT,
    renamed from it, reads like any folder the user makes; ``tempfile.mkdtemp`` would give 0700.
    """
    while True:
        path = parent / f"{prefix}{os.getpid()}-{_host_tag()}-{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue


def _owner_gone(name: str, prefix: str) -> bool:
    """Whether the folder ``name`` is a staging folder of this host whose owner pid is not running."""
    pid, _, rest = name[len(prefix):].partition("-")
    host, _, _ = rest.partition("-")
    if not pid.isdigit() or host != _host_tag() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's live process; an absurd pid is not ours
        return False
    return False


def _stale(parent: Path, prefix: str) -> list[Path]:
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    return [Path(e.path) for e in entries
            if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False) and _owner_gone(e.name, prefix)]


def remove_stale(out: Path | None = None) -> None:
    """Remove the staging folders of deltafix runs that no longer exist, beside ``out`` and in the
    temporary folder, saying so in one line on stderr; restore an OUT a killed run had moved aside.

    Called at the start of every run that writes; folders of live runs (or of other hosts) stay.
    """
    parent = out.resolve().parent if out is not None else None
    stale = _stale(Path(tempfile.gettempdir()), STAGE_PREFIX)
    restored: list[Path] = []
    if parent is not None:
        stale += _stale(parent, TMP_PREFIX)
        for holder in _stale(parent, OLD_PREFIX):
            try:
                for previous in holder.iterdir():
                    if not (parent / previous.name).exists():  # killed between the two renames
                        os.replace(previous, parent / previous.name)
                        restored.append(parent / previous.name)
            except OSError:
                continue  # a holder whose OUT could not be put back is kept, never deleted
            stale.append(holder)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        note = f"; restored {', '.join(map(str, restored))}, which it was replacing" if restored else ""
        print(f"deltafix: removed {len(stale)} staging folder(s) left by killed runs "
              f"({', '.join(p.name for p in stale)}){note}.", file=sys.stderr)


class StagingFolder:
    """A private staging folder under ``$TMPDIR`` (``STAGE_PREFIX``), removed by ``cleanup``, or
    when the object is collected or the interpreter exits, whichever comes first."""

    def __init__(self) -> None:
        try:
            with signals_deferred():
                self.path = make_staging(Path(tempfile.gettempdir()), STAGE_PREFIX)
                self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, True)
        except OSError as err:
            raise OutputError(f"cannot create a staging folder in {tempfile.gettempdir()} ({err.strerror or err}); "
                              "point TMPDIR at a writable disk.") from err

    def cleanup(self) -> None:
        self._finalizer()
