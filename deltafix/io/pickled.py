"""Pickle (``.bin``) checkpoints, read only with ``--allow-pickle`` and only as plain tensors.

Unpickling can run any code the file names, so a ``.bin`` is loaded with
``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which builds tensors, dicts
and numbers and refuses every other global (``os.system``, ``builtins.exec``, any class) before
calling it. Each shard is converted once into safetensors in a private staging folder, so the
rest of deltafix reads it with the ordinary, header-validated ``CheckpointReader``; the folder
lives as long as the reader (``StagingFolder``'s finalizer), and a killed run's is removed by the
next run (``remove_stale``).

A staging folder rather than the deltafix cache: a cache keyed by the ``.bin`` files' SHA-256
would have to hash the whole checkpoint before converting it anyway (converting is a read and a
write of the same size), and would keep a second copy of every pickle model ever repaired on disk.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltafix.errors import InputError
from deltafix.io.lora import WEIGHTS_NAME
from deltafix.io.reader import INDEX_NAME, SINGLE_NAME, CheckpointReader
from deltafix.io.staging import StagingFolder
from deltafix.io.strictjson import parse_json_object

PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_ADAPTER = "adapter_model.bin"


def is_pickle_only(folder: Path) -> bool:
    """Whether ``folder`` holds Hugging Face pickle weights and no safetensors ones."""
    return (folder.is_dir() and not (folder / INDEX_NAME).exists() and not any(folder.glob("*.safetensors"))
            and ((folder / PICKLE_SINGLE).is_file() or (folder / PICKLE_INDEX).is_file()))


def open_checkpoint(folder: Path, allow_pickle: bool) -> CheckpointReader:
    """The checkpoint in ``folder``: converted from pickle when allowed and needed, else read as
    safetensors, which refuses a pickle-only folder with a line naming ``--allow-pickle``."""
    if allow_pickle and is_pickle_only(folder):
        return PickleCheckpoint(folder)
    return CheckpointReader(folder)


def convert_pickle_adapter(folder: Path) -> tuple[StagingFolder, Path]:
    """A PEFT adapter's ``adapter_model.bin`` as a safetensors file in a private staging folder,
    and that folder, which removes itself once nothing holds it (the ``LoraAdapter`` keeps it)."""
    staging = StagingFolder()
    target = staging.path / WEIGHTS_NAME
    _to_safetensors(folder / PICKLE_ADAPTER, target)
    return staging, target


def _to_safetensors(source: Path, target: Path) -> None:
    """Write the tensors of the pickle ``source`` (weights-only) as the safetensors file ``target``."""
    state = _load_tensors(source)
    # contiguous, unshared copies: safetensors refuses views and tied storage
    save_file({k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state.items()},
              str(target), metadata={"format": "pt"})


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from one ``.bin``, by weights-only unpickling; anything else is refused.

    ``mmap=True`` leaves the tensor data in the page cache instead of reading it into memory.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise InputError(f"{path} refused: it holds objects other than tensors, and loading those would run "
                         "code from the file; convert it to safetensors where you trust it.") from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path} cannot be read as a PyTorch checkpoint ({reason}); re-download it or convert "
                         "it to safetensors.") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InputError(f"{path} refused: it holds objects other than tensors; a checkpoint must be a flat map "
                         "of tensor names to tensors.")
    return state


class PickleCheckpoint(CheckpointReader):
    """A pickle-only checkpoint folder as a ``CheckpointReader`` over safetensors converted from it.

    ``folder`` stays the original folder (its ``config.json`` and tokenizer are read from there);
    ``files`` are the converted shards, ``pickle_files`` the ``.bin`` files they came from.
    """

    def __init__(self, folder: str | Path) -> None:
        source = Path(folder)
        self.staging = StagingFolder()
        self.pickle_files = self._convert(source, self.staging.path)
        super().__init__(self.staging.path)
        self.folder = source

    def _convert(self, source: Path, target: Path) -> list[str]:
        """Write each ``.bin`` shard as a safetensors shard (and an index) into ``target``."""
        index = source / PICKLE_INDEX
        if index.is_file():
            weight_map = parse_json_object(index.read_bytes(), index, "re-download the checkpoint.").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise InputError(f"{index} is not a valid index (weight_map is not a map of tensor names to "
                                 "shard files); re-download the checkpoint.")
            shards = sorted(set(weight_map.values()))
        else:
            weight_map, shards = None, [PICKLE_SINGLE]
        names: dict[str, str] = {}
        for shard in shards:
            path = self._inside_source(source, shard, index)
            converted = SINGLE_NAME if weight_map is None else \
                Path(shard).name.replace("pytorch_model", "model").removesuffix(".bin") + ".safetensors"
            _to_safetensors(path, target / converted)
            names[shard] = converted
        if weight_map is not None:
            (target / INDEX_NAME).write_text(json.dumps(
                {"metadata": {}, "weight_map": {k: names[v] for k, v in weight_map.items()}}))
        return shards

    def reopened(self) -> CheckpointReader:
        """A second reader over the converted files (kept as long as this reader lives)."""
        return CheckpointReader(self.staging.path)

    @staticmethod
    def _inside_source(source: Path, shard: str, index: Path) -> Path:
        """``source/shard``, refused unless it is a file inside ``source`` (an index is untrusted)."""
        relative = Path(shard)
        path = source / relative
        if relative.is_absolute() or ".." in relative.parts or not path.resolve().is_relative_to(source.resolve()):
            raise InputError(f"{index} names the shard {shard!r}, which lies outside {source}; a checkpoint may "
                             "only use files inside its folder.")
        if not path.is_file():
            raise InputError(f"{source} lacks the pickle shard {shard}; re-download the checkpoint.")
        return path
