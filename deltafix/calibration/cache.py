"""On-disk cache of a model's Hessians on a calibration set, and read access to them.

H depends only on the aligned model's weights, its config, the token ids of the calibration set
and the compute dtype, so it is computed once per base model and reused for every fine-tune of it.
An entry is a folder ``<cache root>/<key>/`` holding one safetensors file per decoder layer (Linears
that read the same input share one tensor) and ``manifest.json`` with the key, each file's size
and sha256, and where each weight's H is stored. An entry is built in a temporary folder and
renamed into place, so a crash never leaves a half entry under a valid key; an entry that fails
any check (key, missing weight, shape, size, checksum) is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from deltafix.calibration.render import CalibrationSet
from deltafix.errors import InputError
from deltafix.calibration.capture import (
    DEFAULT_BATCH_SIZE,
    build_skeleton,
    capture_hessians,
    decoder_layers,
    hessian_shapes,
)
from deltafix.io.hashing import file_sha256, sha256_file
from deltafix.io.reader import CheckpointReader, TensorIndex, read_safetensors_header
from deltafix.io.staging import StagingFolder
from deltafix.io.writer import atomic_file
from deltafix.env import hessian_cache_dir

log = logging.getLogger(__name__)

CACHE_VERSION = 1
MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """``<deltafix cache>/hessians`` (``$DELTAFIX_CACHE``, else ``~/.cache/deltafix``)."""
    return hessian_cache_dir()



def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cache_key(folder: str | Path, data: CalibrationSet, dtype: torch.dtype,
              source: TensorIndex | None = None) -> str:
    """sha256 of everything H depends on: weight files (the ``source``'s own files too, e.g. a LoRA
    adapter merged on the fly), config, token ids, compute dtype."""
    folder = Path(folder)
    reader = CheckpointReader(folder)
    config = folder / "config.json"
    files = [*reader.files, *getattr(source, "files", [])]
    payload = {
        "version": CACHE_VERSION,
        "weights": {str(i): file_sha256(f) for i, f in enumerate(files)},
        "config": sha256_file(config) if config.exists() else None,
        "data": data.digest,
        "dtype": str(dtype),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class HessianStore:
    """Read access to the Hessians of one cache entry (or of a private temporary one).

    ``get(name)`` loads the ``(in, in)`` fp32 H of a Linear weight (checkpoint name) from disk,
    a fresh CPU tensor each call, so callers may change it in place and memory holds only what
    they keep. ``from_cache`` says whether the entry was reused; ``rebuilt_reason`` why an
    existing entry was discarded, if one was.
    """

    def __init__(
        self,
        entry: Path,
        manifest: dict[str, Any],
        *,
        from_cache: bool,
        rebuilt_reason: str | None = None,
        owner: StagingFolder | None = None,
    ) -> None:
        self.entry = entry
        self.manifest = manifest
        self.from_cache = from_cache
        self.rebuilt_reason = rebuilt_reason
        self._owner = owner

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    @property
    def names(self) -> list[str]:
        return list(self.manifest["weights"])

    @property
    def n_samples(self) -> int:
        return int(self.manifest["n_samples"])

    def __contains__(self, name: str) -> bool:
        return name in self.manifest["weights"]

    def get(self, name: str) -> torch.Tensor:
        where = self.manifest["weights"][name]
        with safe_open(str(self.entry / where["file"]), framework="pt", device="cpu") as fh:
            return fh.get_tensor(where["tensor"])

    def close(self) -> None:
        """Delete the private entry of a ``no_cache`` store; a cache entry is kept."""
        if self._owner is not None:
            self._owner.cleanup()
            self._owner = None


def entry_problem(entry: Path, key: str, shapes: dict[str, int]) -> str | None:
    """Why the entry at ``entry`` cannot be used for ``key`` (None when it can).

    Checks the manifest's key and version, that it lists exactly the expected weights with
    ``(in, in)`` shapes, and that every file has its recorded size, sha256 and tensors.
    """
    manifest = _read_json(entry / MANIFEST)
    if not isinstance(manifest, dict):
        return "its manifest is missing or unreadable"
    if manifest.get("version") != CACHE_VERSION or manifest.get("key") != key:
        return "its manifest has another key or version"
    weights, files = manifest.get("weights"), manifest.get("files")
    if not isinstance(weights, dict) or not isinstance(files, dict):
        return "its manifest is incomplete"
    if set(weights) != set(shapes):
        return f"it holds {len(weights)} Hessians where the model has {len(shapes)}"
    stored: dict[str, dict[str, list[int]]] = {}
    for name, where in weights.items():
        try:
            stored.setdefault(where["file"], {})[where["tensor"]] = [shapes[name], shapes[name]]
        except (KeyError, TypeError):
            return f"its manifest entry for {name} is malformed"
    for file, tensors in stored.items():
        path, record = entry / file, files.get(file)
        if not isinstance(record, dict) or not path.is_file():
            return f"{file} is missing"
        if path.stat().st_size != record.get("size") or sha256_file(path) != record.get("sha256"):
            return f"{file} does not match its checksum"
        try:
            header, _ = read_safetensors_header(path)
        except InputError:
            return f"{file} is not a valid safetensors file"
        for tensor, shape in tensors.items():
            info = header.get(tensor)
            if info is None or list(info.shape) != shape or info.dtype != torch.float32:
                return f"{file} lacks an fp32 {shape[0]}x{shape[1]} tensor {tensor}"
    return None


def _build_entry(
    parent: Path,
    key: str,
    folder: str | Path,
    data: CalibrationSet,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
    n_layers: int,
    source: TensorIndex | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Capture the Hessians layer by layer into a new temporary folder under ``parent``.

    Each layer's file is written as soon as its H exist, so memory holds one layer's H.
    Returns the folder (complete, with its manifest) and the manifest.
    """
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=parent))
    weights: dict[str, dict[str, str]] = {}
    files: dict[str, dict[str, Any]] = {}
    try:
        for layer in capture_hessians(folder, data.samples, device=device, dtype=dtype, batch_size=batch_size,
                                      source=source):
            file = f"layer_{layer.index:05d}.safetensors"
            first_name: dict[int, str] = {}
            for name, h in layer.hessians.items():
                weights[name] = {"file": file, "tensor": first_name.setdefault(id(h), name)}
            blob = save_safetensors({name: layer.hessians[name] for name in first_name.values()})
            atomic_file(work / file, blob)
            files[file] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
            if progress is not None:
                progress(layer.index + 1, n_layers)
        manifest = {
            "version": CACHE_VERSION,
            "key": key,
            "model": str(folder),
            "data_source": data.source,
            "data_digest": data.digest,
            "n_samples": len(data.samples),
            "n_tokens": data.n_tokens,
            "dtype": str(dtype),
            "files": files,
            "weights": weights,
        }
        atomic_file(work / MANIFEST, json.dumps(manifest, indent=1).encode())
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return work, manifest


def _publish(work: Path, entry: Path) -> None:
    """Rename a finished entry into place, replacing a discarded one.

    When another process published the same key meanwhile, its entry (same inputs, same H) stays.
    """
    if entry.exists():
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=entry.parent))
        os.replace(entry, trash / entry.name)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(work, entry)
    except OSError:
        if not entry.is_dir():
            raise
        shutil.rmtree(work, ignore_errors=True)


def hessians_for(
    folder: str | Path,
    data: CalibrationSet,
    *,
    cache_dir: str | Path | None = None,
    no_cache: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int, int], None] | None = None,
    source: TensorIndex | None = None,
) -> HessianStore:
    """The Hessians of the model in ``folder`` on ``data``: from the cache, or captured and cached.

    ``no_cache`` neither reads nor writes the cache: H go to a private staging folder under
    ``$TMPDIR`` (``StagingFolder``) that ``HessianStore.close`` deletes. ``progress(done, total)``
    is called after each layer computed.
    """
    skeleton = build_skeleton(folder)
    shapes = hessian_shapes(skeleton)
    n_layers = len(decoder_layers(skeleton)[1])
    options = {"device": device, "dtype": dtype, "batch_size": batch_size, "progress": progress, "n_layers": n_layers,
               "source": source}
    if no_cache:
        owner = StagingFolder()
        try:
            work, manifest = _build_entry(owner.path, "uncached", folder, data, **options)
        except BaseException:
            owner.cleanup()
            raise
        return HessianStore(work, manifest, from_cache=False, owner=owner)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the Hessian cache folder {root} ({err}); pass another cache folder.") from err
    key = cache_key(folder, data, dtype, source)
    entry = root / key
    reason = entry_problem(entry, key, shapes) if entry.exists() else None
    if entry.exists() and reason is None:
        return HessianStore(entry, _read_json(entry / MANIFEST), from_cache=True)
    if reason is not None:
        log.warning("rebuilding the cached Hessians in %s: %s", entry, reason)
    work, _ = _build_entry(root, key, folder, data, **options)
    _publish(work, entry)
    return HessianStore(entry, _read_json(entry / MANIFEST), from_cache=False, rebuilt_reason=reason)
