"""Lazy tensor access over a Hugging Face checkpoint folder (single or sharded safetensors).

Names, shapes and dtypes come from the safetensors headers alone, so planning and validation
never load tensor data. Data is read one tensor at a time with positioned reads at the offsets
the header gives, or, for piece streaming, through short-lived memory maps of a window of one
tensor; at most one shard per checkpoint is open for reading at any moment, which keeps host
memory flat however large the model is.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from deltafix.errors import InputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    SAFETENSORS_DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    SAFETENSORS_DTYPES["F8_E5M2"] = torch.float8_e5m2

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor: where it lives and what it looks like."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int
    data_start: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors file's header and check that the file holds every byte it promises.

    Returns ``(tensors, metadata)``. A truncated or corrupt file raises ``InputError`` here,
    before any tensor is used, instead of failing half-way through a repair.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise InputError(f"{path} is not a safetensors file (too short); re-download it.")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise InputError(f"{path} has a corrupt safetensors header; re-download it.")
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {path}: {err}; check the file or re-download it.") from err
    if not isinstance(header, dict):
        raise InputError(f"{path} has a corrupt safetensors header; re-download it.")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_len = size - 8 - header_len
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{path}: tensor {name!r} has an unreadable header entry ({err}).") from err
        if end > data_len or end - start != math.prod(shape) * dtype.itemsize:
            raise InputError(f"{path} is truncated or corrupt (tensor {name!r}); re-download it.")
        tensors[name] = TensorInfo(name, shape, dtype, path, start, 8 + header_len + start)
    return tensors, metadata


class CheckpointReader:
    """Index of a checkpoint folder's tensors plus lazy, one-shard-at-a-time data access."""

    def __init__(self, folder: str | Path, *, allow_pickle: bool = False) -> None:
        self.folder = Path(folder)
        if not self.folder.exists():
            raise InputError(f"{self.folder} does not exist.")
        if not self.folder.is_dir():
            raise InputError(f"{self.folder} is not a folder; pass a checkpoint folder.")
        self.files = self._shard_files(allow_pickle)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for file in self.files:
            tensors, metadata = read_safetensors_header(file)
            self.metadata.update(metadata)
            for name, info in tensors.items():
                if name in self.tensors:
                    raise InputError(f"{self.folder}: tensor {name!r} appears in two shards.")
                self.tensors[name] = info
        self._check_index()
        self._open_file: Path | None = None
        self._handle = None

    def _shard_files(self, allow_pickle: bool) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.exists():
            self._index = self._load_index(index)
            files = sorted({self.folder / f for f in self._index.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise InputError(
                    f"{index} points to missing shard(s) {', '.join(missing)}; re-download the checkpoint."
                )
            return files
        self._index = None
        single = self.folder / SINGLE_NAME
        if single.exists():
            return [single]
        found = sorted(self.folder.glob("*.safetensors"))
        if len(found) == 1:
            return found
        if len(found) > 1:
            raise InputError(f"{self.folder} holds several .safetensors files but no {INDEX_NAME}.")
        if any((self.folder / n).exists() for n in PICKLE_NAMES) or list(self.folder.glob("*.bin")):
            raise InputError(
                f"{self.folder} has only pickle (.bin) weights, which can run code when loaded; "
                "convert them to safetensors (or pass --allow-pickle if you trust the source)."
                if not allow_pickle
                else f"{self.folder}: pickle weights are not supported yet; convert them to safetensors."
            )
        raise InputError(f"{self.folder} contains no safetensors weights (model.safetensors or an index).")

    @staticmethod
    def _load_index(index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(f"{index} is not a valid safetensors index ({err}).") from err
        if not isinstance(weight_map, dict):
            raise InputError(f"{index} is not a valid safetensors index (weight_map is not a mapping).")
        return weight_map

    def _check_index(self) -> None:
        if self._index is None:
            return
        for name, file in self._index.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != Path(file).name:
                raise InputError(
                    f"{self.folder / INDEX_NAME} lists {name!r} in {file}, but that shard does not hold it."
                )

    @property
    def names(self) -> list[str]:
        """Tensor names in storage order (shard by shard, by offset): the cheapest order to read."""
        order = {f: i for i, f in enumerate(self.files)}
        return sorted(self.tensors, key=lambda n: (order[self.tensors[n].file], self.tensors[n].offset))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (CPU, its stored dtype). Switching shards closes the previous one.

        The bytes are read with a plain positioned read into a fresh buffer rather than through a
        memory map, so a shard's pages do not stay resident after their tensors are used: host
        memory holds the tensors in flight, not the shard. Offsets were validated with the header.
        """
        info = self.tensors[name]
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._open_file != info.file:
            self.close()
            self._handle = info.file.open("rb")
            self._open_file = info.file
        buffer = bytearray(info.nbytes)
        try:
            self._handle.seek(info.data_start)
            read = self._handle.readinto(buffer)  # a buffered file reads until full or EOF
        except OSError as err:
            raise InputError(f"cannot read {name!r} from {info.file}: {err.strerror or err}.") from err
        if read != info.nbytes:
            raise InputError(f"{info.file} is truncated (tensor {name!r}); re-download it.")
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)

    def mapped(self, name: str, start: int, count: int) -> torch.Tensor:
        """Elements ``start .. start + count`` of the flattened tensor as a read-only view of the
        file, through a memory map of just that range; it is unmapped when the view is freed.

        Elementwise methods convert pieces straight from the page cache this way, skipping the
        copy into a buffer that a read costs (bf16 to fp32 from a map: 0.55 ns an element; read
        into a buffer, then converted: 0.95 ns).
        Mapping a window, not the tensor, keeps the pages counted in this process's RSS bounded.
        Offsets were validated against the file size with the header; a file truncated while it
        is being read would end the process with SIGBUS, as with any memory-mapped loader.
        """
        info = self.tensors[name]
        if start < 0 or count < 0 or start + count > info.numel:
            raise ValueError(f"mapped({name!r}): elements {start}..{start + count} lie outside the tensor")
        if not count:
            return torch.empty(0, dtype=info.dtype)
        first = info.data_start + start * info.dtype.itemsize
        aligned = first - first % mmap.ALLOCATIONGRANULARITY
        try:
            with info.file.open("rb") as fh:
                region = mmap.mmap(fh.fileno(), first - aligned + count * info.dtype.itemsize,
                                   access=mmap.ACCESS_READ, offset=aligned)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot map {info.name!r} from {info.file}: {err}.") from err
        with warnings.catch_warnings():  # torch warns that the map is read-only; nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(region, dtype=info.dtype, offset=first - aligned, count=count)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = None
        self._open_file = None

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

