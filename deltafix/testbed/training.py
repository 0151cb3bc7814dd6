"""Tokenizer, model and the small training loop that turn the testbed language into checkpoints.

The tokenizer is word-level (``tokenizers`` WordLevel over the language's vocabulary) wrapped in
``PreTrainedTokenizerFast`` with a chat template, so every consumer renders prompts exactly as
it would for a real chat model. Models are ``LlamaForCausalLM`` with untied embeddings (like
Llama-2), trained with plain AdamW on response tokens only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from deltafix.env import bar, progress_bars

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIALS = (PAD, BOS, EOS, UNK, USER, ASSISTANT)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|> {{ message['content'] }} {{ eos_token }} "
    "{% else %}"
    "<|user|> {{ message['content'] }} "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` with Llama-like special tokens and a chat template.

    Ids 0-5 are the specials (pad, bos, eos, unk, user, assistant); words follow in the given
    order. Plain ``tokenizer(text)`` prepends ``<s>`` like Llama's; chat rendering puts it in
    the template instead (tokenize rendered chats with ``add_special_tokens=False``). System
    messages are rendered like user turns.
    """
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class ModelShape:
    """Size of the testbed model (a few hundred thousand parameters)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    max_positions: int = 64


def new_model(tokenizer: PreTrainedTokenizerFast, shape: ModelShape, seed: int) -> LlamaForCausalLM:
    """A freshly initialised fp32 Llama whose vocabulary is exactly the tokenizer's."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    return model


def encode(
    tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[str, str]]
) -> list[tuple[list[int], list[int]]]:
    """Token ids of each chat ``prompt -> response`` and its labels (-100 on the prompt part).

    Both the prompt with the generation prompt and the whole exchange are rendered with the
    chat template, then tokenised in one batch call (per-call overhead dominates for tiny texts).
    """
    heads, fulls = [], []
    for prompt, response in pairs:
        user = [{"role": "user", "content": prompt}]
        heads.append(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False))
        chat = user + [{"role": "assistant", "content": response}]
        fulls.append(tokenizer.apply_chat_template(chat, tokenize=False))
    head_ids = tokenizer(heads, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    encoded = []
    for head, ids in zip(head_ids, full_ids):
        assert ids[: len(head)] == head, "the chat template must render the prompt as a prefix"
        encoded.append((ids, [-100] * len(head) + ids[len(head) :]))
    return encoded


@dataclass(frozen=True)
class Schedule:
    """Optimiser settings of one training phase."""

    steps: int
    lr: float
    batch_size: int = 32
    warmup: int = 20


def train(
    model: torch.nn.Module,
    examples: list[tuple[list[int], list[int]]],
    schedule: Schedule,
    pad_id: int,
    seed: int,
    desc: str = "train",
    progress: bool = False,
) -> list[float]:
    """Train ``model`` in place on encoded examples; returns the loss of every step.

    Batches are drawn by a seeded permutation (reshuffled each epoch), right-padded; the loss is
    the mean cross-entropy over response tokens. LR: linear warm-up, then cosine decay to 0.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=0.0)

    def lr_factor(step: int) -> float:
        if step < schedule.warmup:
            return (step + 1) / schedule.warmup
        progress = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    model.train()
    with progress_bars(progress):
        for _ in bar(range(schedule.steps), desc=desc):
            if len(order) < schedule.batch_size:
                order += torch.randperm(len(examples), generator=generator).tolist()
            batch = [examples[i] for i in order[: schedule.batch_size]]
            del order[: schedule.batch_size]
            input_ids, labels, mask = collate(batch, pad_id)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    model.eval()
    return losses


def collate(
    batch: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch: ``(input_ids, labels, attention_mask)``, each (batch, longest) int64."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return input_ids, labels, mask
