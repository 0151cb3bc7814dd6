"""Layer-sequential capture of the Hessians ``H = (2/N) Σ XᵀX`` of a model's decoder-layer Linears.

``X`` holds the inputs of one ``nn.Linear`` (one row per unpadded token of every sample) when the
model runs on the calibration samples, and ``N`` is the number of samples (sequences), as in
SparseGPT/GPTQ's ``add_batch``, whose running mean ends at the same ``(2/N) Σ XᵀX``.

The model is never loaded whole: its skeleton is built on the meta device from ``config.json``;
the embedding (and the other small modules that run before layer 0) is materialised to record
each layer's inputs; then one decoder layer at a time is loaded from the shards, run over every
batch with hooks that accumulate H, and freed. Its outputs are the next layer's inputs, so H
depends only on the checkpoint and the samples. Memory: one decoder layer, its H, and the
activations of the calibration set.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from deltafix.env import bar
from deltafix.errors import InputError
from deltafix.io.reader import CheckpointReader, TensorIndex
from deltafix.methods.stats import all_finite

DEFAULT_BATCH_SIZE = 8


@dataclass
class LayerHessians:
    """The Hessians of one decoder layer's Linears, keyed by the checkpoint's weight name.

    Each value is ``(in, in)`` fp32 on the CPU. Linears that read the very same input tensor
    (q/k/v, gate/up in Llama) map to one shared tensor object, which the cache stores once.
    """

    index: int
    hessians: dict[str, torch.Tensor]


@dataclass
class LayerBatch:
    """One padded batch on its way through the layers.

    ``hidden`` (B, T, d) are the current layer's inputs, ``mask`` (B, T) bool marks real tokens,
    ``calls[i]`` the extra positional and keyword arguments the model passes to layer i
    (attention mask, position embeddings...), recorded once from the model's own forward.
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)


class StopForward(Exception):
    """Ends the recording forward after the last layer's arguments are known."""


def build_skeleton(folder: str | Path) -> PreTrainedModel:
    """The causal LM of ``folder/config.json`` with every parameter on the meta device.

    Buffers stay real (``include_buffers=False``): rotary frequencies are computed from the
    config at construction and are not in the checkpoint.
    """
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the model config of {folder} ({err}).") from err
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except ValueError as err:
        raise InputError(f"{folder}: transformers cannot build this model type as a causal LM ({err}).") from err
    return model.eval()


def decoder_layers(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """The decoder layer list and its qualified name (``model.layers`` for Llama, Qwen2, Mistral)."""
    config = model.config
    n_layers = (config.get_text_config() if hasattr(config, "get_text_config") else config).num_hidden_layers
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers
    ]
    if len(found) > 1:
        found = [(name, module) for name, module in found if name.endswith("layers")]
    if len(found) != 1:
        raise InputError(
            f"cannot find the decoder layers of {type(model).__name__}; calibration supports decoder-only models."
        )
    return found[0]


def hessian_shapes(model: PreTrainedModel) -> dict[str, int]:
    """Weight name -> in_features of every Linear inside the decoder layers: the H that exist."""
    prefix, layers = decoder_layers(model)
    return {
        f"{prefix}.{i}.{name}.weight": module.in_features
        for i, layer in enumerate(layers)
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
    }


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (root.get_submodule(parent) if parent else root), leaf


def materialise(
    module: nn.Module,
    prefix: str,
    source: TensorIndex,
    device: torch.device,
    dtype: torch.dtype,
    skip: str | None = None,
) -> None:
    """Load ``module``'s parameters (checkpoint names ``prefix.<name>``) onto ``device``.

    Each loaded tensor is checked for NaN/Inf here, where calibration first meets it: run
    through the model, one NaN weight makes every Hessian NaN, and the solve that fails on it
    later could only blame its damping.

    Floating parameters are cast to the compute ``dtype``; buffers keep theirs (rotary
    frequencies stay fp32). Buffers that the checkpoint holds are loaded too; the others
    (computed at construction) are moved. Names under ``skip`` are left.
    """
    tensors = [(n, True) for n, _ in module.named_parameters()] + [(n, False) for n, _ in module.named_buffers()]
    for name, is_param in tensors:
        if skip is not None and name.startswith(skip + "."):
            continue
        owner, leaf = _owner(module, name)
        current = getattr(owner, leaf)
        full = f"{prefix}.{name}" if prefix else name
        if full in source:
            value = source.get(full)
            if tuple(value.shape) != tuple(current.shape):
                raise InputError(
                    f"tensor {full} has shape {tuple(value.shape)} but the config implies {tuple(current.shape)}."
                )
            if value.is_floating_point() and not all_finite(value):
                raise InputError(f"{getattr(source, 'folder', 'the checkpoint')}: tensor {full!r} contains NaN or "
                                 "Inf, and calibration runs the model on it; fix or re-download that checkpoint.")
        elif is_param:
            raise InputError(f"the checkpoint lacks tensor {full}, which calibration needs; is it complete?")
        else:
            value = current
        cast = is_param and value.is_floating_point()
        value = value.to(device=device, dtype=dtype if cast else value.dtype)
        setattr(owner, leaf, nn.Parameter(value, requires_grad=False) if is_param else value)


def make_batches(samples: Sequence[torch.Tensor], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(ids (B, T) int64, mask (B, T) bool)`` batches, samples sorted by length.

    Sorting keeps padding small; the order does not change H (a sum over tokens). Padded
    positions hold token 0 and are masked out of attention and of the Hessians.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, not {batch_size}.")
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [samples[i] for i in order[start : start + batch_size]]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.int64)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        for row, sample in enumerate(chunk):
            ids[row, : len(sample)] = sample
            mask[row, : len(sample)] = True
        batches.append((ids, mask))
    return batches


def record_layer_inputs(
    base: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, mask: torch.Tensor
) -> LayerBatch:
    """Run the model's own forward with every layer replaced by a recorder.

    The model computes the attention masks and position embeddings it hands each layer (they
    can differ per layer, e.g. sliding-window layers); the recorders keep them and pass the
    hidden states through untouched, and the last one stops the forward before the final norm.
    """
    calls: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = [None] * len(layers)
    first: list[torch.Tensor] = []

    def recorder(i: int):
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            if "hidden_states" in kwargs:
                hidden = kwargs.pop("hidden_states")
            else:
                hidden, args = args[0], args[1:]
            calls[i] = (args, kwargs)
            if i == 0:
                first.append(hidden)
            if i == len(layers) - 1:
                raise StopForward
            return hidden

        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        base(input_ids=ids, attention_mask=mask.long(), use_cache=False)
    except StopForward:
        pass
    finally:
        for layer in layers:
            del layer.forward
    if not first or any(call is None for call in calls):
        raise InputError(f"{type(base).__name__} does not call each decoder layer once; calibration cannot follow it.")
    return LayerBatch(hidden=first[0], mask=mask, calls=calls)  # type: ignore[arg-type]


class _InputGrams:
    """Running ``Σ XᵀX`` (fp32, on the device) of the inputs of one layer's Linears.

    Forward pre-hooks call it with each Linear's input (B, T, in); only the rows that ``mask``
    (B, T) marks as real tokens are added. Linears that read the very same tensor object in a
    forward (q/k/v, gate/up in Llama) share one Gram, which is computed once per batch.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.grams: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self._added: list[tuple[weakref.ref[torch.Tensor], torch.Tensor]] = []

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self._added.clear()

    def add(self, name: str, x: torch.Tensor) -> None:
        gram = self.grams.get(name)
        for ref, added_to in self._added:
            if ref() is x:
                self.grams.setdefault(name, added_to)
                return
        assert self.mask is not None
        if x.shape[:-1] != self.mask.shape:
            raise InputError(f"Linear {name} does not see one input row per token; calibration cannot handle it.")
        if gram is None:
            gram = self.grams[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=self.device)
        rows = x[self.mask].to(torch.float32)
        gram.addmm_(rows.T, rows)
        self._added.append((weakref.ref(x), gram))

    def of(self, linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
        """Every Linear's Gram; one that never ran gets zeros (all its inputs are dead)."""
        for name, m in linears.items():
            if name not in self.grams:
                self.grams[name] = torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=self.device)
        return {name: self.grams[name] for name in linears}


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; a no-op elsewhere).

    glibc keeps freed blocks below its dynamic mmap threshold (up to 32 MB) in the heap; with
    layers of such tensors, host RSS would grow by about one layer per layer without this.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def run_layer(layer: nn.Module, batch: LayerBatch, index: int) -> None:
    args, kwargs = batch.calls[index]
    out = layer(batch.hidden, *args, **kwargs)
    batch.hidden = out[0] if isinstance(out, tuple) else out


def _layer_grams(layer: nn.Module, batches: list[LayerBatch], index: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``Σ XᵀX`` per Linear of one layer over every batch; the outputs replace ``batch.hidden``."""
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    grams = _InputGrams(device)
    handles = [
        module.register_forward_pre_hook(lambda _m, args, name=name: grams.add(name, args[0]))
        for name, module in linears.items()
    ]
    try:
        for batch in batches:
            grams.start_batch(batch.mask)
            run_layer(layer, batch, index)
    finally:
        for handle in handles:
            handle.remove()
    return grams.of(linears)


@torch.no_grad()
def capture_hessians(
    folder: str | Path,
    samples: Sequence[torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = DEFAULT_BATCH_SIZE,
    source: TensorIndex | None = None,
) -> Iterator[LayerHessians]:
    """Yield ``H = (2/N) Σ XᵀX`` for every decoder-layer Linear, one layer at a time.

    ``samples`` are 1-D int64 token id tensors; N = ``len(samples)``. The layers run in ``dtype``
    on ``device``; Grams accumulate in fp32. ``source`` overrides where weights are read from
    (default: the folder's safetensors); its open shard is closed after each layer so host memory
    holds one layer, not the mapped shard.
    """
    if not samples:
        raise InputError("the calibration set is empty; give at least one sample.")
    device = torch.device(device)
    own_source = source is None
    reader: TensorIndex = CheckpointReader(folder) if source is None else source
    model = build_skeleton(folder)
    prefix, layers = decoder_layers(model)
    base_prefix, _, layers_name = prefix.rpartition(".")
    base = model.get_submodule(base_prefix)
    try:
        materialise(base, base_prefix, reader, device, dtype, skip=layers_name)
        reader.close()
        batches = [
            record_layer_inputs(base, layers, ids.to(device), mask.to(device))
            for ids, mask in make_batches(samples, batch_size)
        ]
        for name, child in base.named_children():
            if name != layers_name:
                child.to("meta")
        scale = 2.0 / len(samples)
        for index, layer in enumerate(bar(layers, desc=f"calibrate {Path(folder).name}", unit="layer")):
            materialise(layer, f"{prefix}.{index}", reader, device, dtype)
            reader.close()
            grams = _layer_grams(layer, batches, index, device)
            layer.to("meta")
            return_freed_memory()
            hessians: dict[str, torch.Tensor] = {}
            done: dict[int, torch.Tensor] = {}
            for name, gram in grams.items():
                if id(gram) not in done:
                    done[id(gram)] = gram.mul_(scale).cpu()
                hessians[f"{prefix}.{index}.{name}.weight"] = done[id(gram)]
            yield LayerHessians(index=index, hessians=hessians)
    finally:
        if own_source:
            reader.close()
