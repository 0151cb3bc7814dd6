"""Sharded safetensors writer and atomic publishing of the output folder.

The shard layout is planned from headers before any data is computed (so ``--dry-run`` can show
it), each shard file is written once, front to back, as its tensors arrive, and the whole folder is
built under ``<parent of OUT>/.deltafix-tmp-<pid>-*`` (``staging``) and renamed into place only
after every shard re-opens with the planned names, shapes and dtypes. A crash, Ctrl-C or full disk
leaves OUT as it was and removes the temporary folder.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import tempfile
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import torch
from safetensors import safe_open

from deltafix.errors import OptionError, OutputError
from deltafix.io.reader import INDEX_NAME, SAFETENSORS_DTYPES, SINGLE_NAME
from deltafix.io.staging import OLD_PREFIX, TMP_PREFIX, make_staging, signals_deferred

SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12,
              "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
"""Suffixes of a size, upper-cased. A bare K/M/B/T counts thousands, millions, billions, trillions
of bytes as mergekit reads them (``5B`` is 5 billion bytes, never 5 bytes); KB..TB are decimal
bytes as on the Hub, KiB..TiB binary."""
MIN_SHARD_BYTES = 10**6
"""Smallest shard size accepted: below it a checkpoint splits into one file per tensor, which is
what a mistyped unit gives, never what a user wants."""
SIZE_EXAMPLES = "write it like 5B or 5GB (5 billion bytes), 500M or 500MB, 2GiB"


def parse_size(text: str | int) -> int:
    """``"5B"``, ``"5GB"`` -> 5_000_000_000 bytes; ``"2GiB"`` -> 2 * 2**30; a bare number is bytes.

    Sizes below ``MIN_SHARD_BYTES`` are refused: every caller reads a shard size.
    """
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
        unit = match.group(2).upper() if match else ""
        if not match or unit not in SIZE_UNITS:
            raise OptionError(f"cannot read size {text!r}; {SIZE_EXAMPLES}.")
        size = int(float(match.group(1)) * SIZE_UNITS[unit])
    if size < MIN_SHARD_BYTES:
        raise OptionError(f"--out-shard-size {text!r} is {size} bytes, below the smallest allowed, 1MB; "
                          f"{SIZE_EXAMPLES}.")
    return size


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ShardPlan:
    """Which tensors go into which output file, filled in order up to ``max_bytes`` per shard."""

    shards: list[list[TensorSpec]]

    @classmethod
    def build(cls, specs: list[TensorSpec], max_bytes: int) -> "ShardPlan":
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if shards[-1] and size + spec.nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        return cls(shards)

    def file_name(self, i: int) -> str:
        if len(self.shards) == 1:
            return SINGLE_NAME
        return f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for shard in self.shards for s in shard)

    def largest_shard_bytes(self) -> int:
        return max(sum(s.nbytes for s in shard) for shard in self.shards)


DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""Write errors that mean the output does not fit (device full, quota, file size limit)."""


def _disk_error(err: OSError, where: Path) -> OutputError:
    if err.errno == errno.ENOSPC:
        return OutputError(f"no space left on the device while writing {where}; free space and run again.")
    if err.errno in DISK_FULL:
        return OutputError(f"cannot write {where}: {err.strerror or err}; free space or raise the limit and run again.")
    return OutputError(f"cannot write {where}: {err.strerror or err}.")


def _start_writeback(fd: int, start: int, length: int) -> None:
    """Have the kernel start writing these bytes to disk now instead of when dirty memory runs
    high: the disk then works while the next tensors are computed, and the fsync before publishing
    (``atomic_output``) finds little left to do. Linux starts asynchronous writeback of a range on
    ``POSIX_FADV_DONTNEED`` (pages still dirty or in flight stay cached); elsewhere this is a no-op."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)


DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The 8-byte length + JSON header of a safetensors file holding ``specs`` in that order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Receives tensors in plan order and streams them straight into their shard files.

    The header of a shard is known from the plan, so each tensor's bytes are written as soon as
    it arrives: memory holds one tensor, not one shard (``safetensors.save_file`` would need the
    whole shard in memory). The files are re-read with ``safe_open`` in ``verify``.
    """

    def __init__(self, folder: Path, plan: ShardPlan, metadata: dict[str, str]) -> None:
        self.folder = folder
        self.plan = plan
        self.metadata = {"format": "pt", **metadata}
        self._order = [(i, spec) for i, shard in enumerate(plan.shards) for spec in shard]
        self._next = 0
        self._file: BinaryIO | None = None
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        shard, spec = self._order[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"writer expected {spec}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        path = self.folder / self.plan.file_name(shard)
        try:
            if self._file is None:
                self._file = path.open("wb")
                self._offset = self._file.write(safetensors_header(self.plan.shards[shard], self.metadata))
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                self._file.write(memoryview(data.view(torch.uint8).numpy()))
                self._file.flush()
                _start_writeback(self._file.fileno(), self._offset, spec.nbytes)
                self._offset += spec.nbytes
            self._next += 1
            if self._next == len(self._order) or self._order[self._next][0] != shard:
                self._file.close()
                self._file = None
        except OSError as err:
            raise _disk_error(err, path) from err

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def finish(self) -> None:
        """Check every planned tensor arrived, write the index and re-verify every shard."""
        self.close()
        if self._next != len(self._order):
            raise RuntimeError(f"writer got {self._next} of {len(self._order)} tensors")
        if len(self.plan.shards) > 1:
            index = {
                "metadata": {"total_size": self.plan.total_bytes},
                "weight_map": {
                    spec.name: self.plan.file_name(i) for i, shard in enumerate(self.plan.shards) for spec in shard
                },
            }
            try:
                (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            except OSError as err:
                raise _disk_error(err, self.folder / INDEX_NAME) from err
        self.verify()

    def verify(self) -> None:
        """Re-open every written shard and compare names, shapes and dtypes with the plan."""
        for i, shard in enumerate(self.plan.shards):
            path = self.folder / self.plan.file_name(i)
            with safe_open(str(path), framework="pt") as fh:
                names = set(fh.keys())
                if names != {s.name for s in shard}:
                    raise OutputError(f"{path.name} was written incompletely; the output was not published.")
                for spec in shard:
                    sl = fh.get_slice(spec.name)
                    if tuple(sl.get_shape()) != spec.shape or SAFETENSORS_DTYPES.get(sl.get_dtype()) != spec.dtype:
                        raise OutputError(
                            f"{path.name}: {spec.name} was written with the wrong shape or dtype; output not published."
                        )


def check_output_location(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an OUT that would clobber data: non-empty without --overwrite, or inside an input."""
    resolved = out.resolve()
    for folder in inputs:
        src = folder.resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise OutputError(f"output {out} overlaps the input {folder}; choose a separate folder.")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"output {out} is not empty; pass --overwrite to replace it.")


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a staging folder beside ``out``; on success it replaces ``out`` in one rename.

    On any exception (KeyboardInterrupt and a signal handler's exception included) the staging
    folder is removed and ``out`` is left exactly as it was. A full disk or quota while the
    output is built (shards, report, card) is an ``OutputError``. An existing ``out`` is moved
    aside into a holder folder first and moved back if the new one cannot take its place; the
    names say whose they are, so a run killed mid-way is cleaned up by the next (``staging``).
    """
    parent = out.resolve().parent
    tmp: Path | None = None
    try:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            with signals_deferred():  # a signal is delivered only once the cleanup below covers tmp
                tmp = make_staging(parent, TMP_PREFIX)
        except OSError as err:
            raise _disk_error(err, parent) from err
        try:
            yield tmp
        except OSError as err:
            if err.errno not in DISK_FULL:
                raise
            raise _disk_error(err, out) from err
        try:
            _fsync_tree(tmp)
            if out.exists():
                _replace(tmp, out, parent)
            else:
                os.replace(tmp, out)
        except OSError as err:
            raise _disk_error(err, out) from err
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_file(path: Path, data: bytes) -> None:
    """Write one file whole or not at all: a fsynced temporary sibling, then one rename.

    The folder-level ``atomic_output`` is for outputs made of many files; this is for a single
    file written next to others (a report, a cache manifest, an answers log), where a reader
    or a crash must never see half of it. A temporary left by a kill is named after ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _replace(new: Path, out: Path, parent: Path) -> None:
    """Put ``new`` in the place of the existing ``out``: two renames, undone if the second fails
    or is interrupted, so ``out`` is never left missing by this process."""
    with signals_deferred():  # three quick steps that must not be cut apart by Ctrl-C or SIGTERM
        holder = make_staging(parent, OLD_PREFIX)
        previous = holder / out.name
        try:
            os.replace(out, previous)
        except OSError:
            _remove_empty(holder)
            raise
        try:
            os.replace(new, out)
        except OSError:
            os.replace(previous, out)  # should this fail too, the next run's ``remove_stale`` restores it
            _remove_empty(holder)
            raise
        shutil.rmtree(holder, ignore_errors=True)


def _remove_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()
