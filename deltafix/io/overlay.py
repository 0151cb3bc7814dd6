"""A PEFT adapter seen as a full checkpoint: A's tensors with the adapter merged in, lazily.

Being a ``TensorIndex``, like ``CheckpointReader``, lets every dense method and the whole streaming
pipeline treat an adapter fine-tune exactly like a full one: ``get(name)`` returns the merged
value of one tensor (PEFT's rules, fp32) and nothing else is ever materialised.
"""

from __future__ import annotations

from pathlib import Path

import torch

from deltafix.io.lora import LoraAdapter, is_adapter_folder
from deltafix.io.pickled import PICKLE_ADAPTER, open_checkpoint
from deltafix.io.reader import CheckpointReader, TensorIndex, TensorInfo


class AdapterCheckpoint:
    """``base`` + ``adapter`` as a ``TensorIndex`` (names, headers, lazy merged tensors)."""

    def __init__(self, base: CheckpointReader, adapter: LoraAdapter) -> None:
        self.base = base
        self.adapter = adapter
        self.folder = adapter.folder
        self.files = [adapter.weights_file]
        self.pickle_files = [PICKLE_ADAPTER] if adapter.keep_alive is not None else []
        """The pickle file ``files`` were converted from (``--allow-pickle``), if any."""
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {
            name: adapter.replaced.get(name, info) for name, info in base.tensors.items()
        }

    @property
    def names(self) -> list[str]:
        return self.base.names

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def get(self, name: str) -> torch.Tensor:
        """The merged value (fp32 for tensors the adapter touches, stored dtype otherwise)."""
        tensor = self.base.get(name)
        if name in self.adapter.touched_names:
            return self.adapter.updated(name, tensor)
        return tensor

    def close(self) -> None:
        self.base.close()

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def open_finetuned(folder: Path, aligned: CheckpointReader, allow_pickle: bool = False) -> TensorIndex:
    """F as a reader: a full checkpoint folder, or an adapter folder merged onto A on the fly;
    pickle weights of either only with ``allow_pickle`` (``io.pickled``)."""
    if not is_adapter_folder(folder):
        return open_checkpoint(folder, allow_pickle)
    adapter = LoraAdapter.load(folder, base=aligned, allow_pickle=allow_pickle)
    return AdapterCheckpoint(aligned.reopened(), adapter)
