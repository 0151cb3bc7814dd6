"""Tiny real base models and PEFT adapters for the LoRA tests (built locally, no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_CONV1DS = ["c_attn", "c_proj", "c_fc"]


def tiny_llama(hidden: int = 32, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def save_base(model, folder: Path, strip_prefix: str = "") -> Path:
    """Save ``model``; with ``strip_prefix``, store names without it, like the hub's gpt2."""
    model.save_pretrained(folder)
    if strip_prefix:
        weights = folder / "model.safetensors"
        tensors = load_file(weights)
        save_file({k.removeprefix(strip_prefix): v for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    return folder


def load_base(folder: Path):
    loader = GPT2LMHeadModel if "gpt2" in (folder / "config.json").read_text() else LlamaForCausalLM
    return loader.from_pretrained(folder)


def save_adapter(base_folder: Path, folder: Path, config: LoraConfig, seed: int = 1) -> Path:
    """Wrap the base in a PEFT model, move every trainable tensor off its init, save the adapter.

    Trained tensors include B (non-zero), DoRA magnitudes, ``lora_B.bias``, trainable base
    biases and ``modules_to_save`` copies, so every rule of the merge is exercised.
    """
    model = get_peft_model(load_base(base_folder), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    return folder


def peft_merged(base_folder: Path, adapter_folder: Path) -> dict[str, torch.Tensor]:
    """State dict of PEFT's own ``merge_and_unload`` of the adapter onto the base."""
    model = PeftModel.from_pretrained(load_base(base_folder), adapter_folder)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
