"""Shared fixtures: tiny real checkpoints built locally (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # pytest-xdist runs a worker per core: one torch thread each, and for the console scripts they start,
    # or every core would carry several spinning OpenMP teams (the real default repair took 3x longer).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False)


def save_tiny_llama(folder: Path, seed: int, base: Path | None = None, noise: float = 0.02,
                    dtype: torch.dtype = torch.float32) -> Path:
    """A tiny LlamaForCausalLM; with ``base``, the base's weights plus seeded Gaussian noise."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    if base is not None:
        model = LlamaForCausalLM.from_pretrained(base)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=gen))
    model.to(dtype).save_pretrained(folder)
    return folder


def save_chat_models(root: Path, names: str) -> dict[str, Path]:
    """One tiny Llama with the testbed's chat tokenizer per letter of ``names``, each the previous
    plus seeded noise (``"PAF"``: A = P + noise, F = A + noise), saved under ``root/<letter>``:
    models that answer prompts, so eval, gate and screening can run on them."""
    from deltafix.testbed.language import vocabulary
    from deltafix.testbed.training import ModelShape, build_tokenizer, new_model

    tokenizer = build_tokenizer(vocabulary())
    model = new_model(tokenizer, ModelShape(hidden=32, layers=2, heads=4, intermediate=64), seed=0)
    generator = torch.Generator().manual_seed(0)
    folders = {}
    for name in names:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders[name] = root / name
    return folders


@pytest.fixture(scope="session")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """P (pretrained), A (aligned = P + noise), F (fine-tuned = A + noise), all float32."""
    root = tmp_path_factory.mktemp("trio")
    p = save_tiny_llama(root / "P", seed=0)
    a = save_tiny_llama(root / "A", seed=1, base=p)
    f = save_tiny_llama(root / "F", seed=2, base=a)
    return {"P": p, "A": a, "F": f}


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], n_shards: int) -> Path:
    """Hand-made sharded checkpoint: tensors split round-robin over ``n_shards`` files + index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    groups = [names[i::n_shards] for i in range(n_shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return folder


@pytest.fixture(scope="session")
def bed():
    """The testbed (P, A, F, F_benign, F_lora + data), built once into the deltafix cache."""
    from deltafix.testbed import build_testbed

    return build_testbed(progress=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Real-model tests first: the default repair of the real model is the longest test by minutes,
    and pytest-xdist hands tests out in this order, so it starts at once on one worker while the
    other workers share everything else (``--maxschedchunk`` keeps a worker from queueing more)."""
    items.sort(key=lambda item: item.get_closest_marker("real") is None)
