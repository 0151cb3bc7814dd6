"""Safety calibration data: read the JSONL set S and render it to token ids with A's tokenizer.

Each line is ``{"prompt": str, "response": str}`` or ``{"messages": [{"role", "content"}, ...]}``;
other keys (``category``, ``id``...) are allowed and ignored. A conversation is rendered with the
tokenizer's chat template when it has one (the whole conversation, response included, because the
Hessians cover every token the aligned model sees), else as ``prompt\\nresponse`` plus EOS. The
result is a ``CalibrationSet`` of 1-D int64 token id tensors, at most ``max_length`` long each.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import torch
from jinja2 import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from deltafix.builtin_data import SAFETY_CALIBRATION
from deltafix.calibration.templates import DEFAULT_SAFETY_TEMPLATE, SafetyTemplate, templated
from deltafix.io.jsonl import Conversation, conversation_of, read_jsonl
from deltafix.errors import InputError

DEFAULT_MAX_LENGTH = 512


def read_conversations(path: str | Path) -> list[tuple[str, Conversation]]:
    """Parse a safety JSONL file into ``(file:line, conversation)`` pairs (``deltafix.io.jsonl`` reads and checks them)."""
    return [(where, conversation_of(record, where)) for where, record in read_jsonl(path, "safety data file")]


def render(conversation: Conversation, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of one whole conversation as the model would see it in chat.

    With a chat template: the template's own tokens (``add_special_tokens`` is off, the template
    writes BOS itself). Without: the message texts joined by newlines, the tokenizer's usual
    special tokens, and EOS so the model sees the response end.
    """
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False))
    ids = list(tokenizer("\n".join(m["content"] for m in conversation))["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


@dataclass(frozen=True)
class CalibrationSet:
    """The rendered calibration data: what the Hessians of a model are computed on.

    ``samples`` are 1-D int64 token id tensors (one per conversation, at most ``max_length``
    long); ``truncated`` counts conversations cut at ``max_length``; ``templated`` says whether
    the chat template was used; ``available`` is how many conversations the file holds (more
    than ``len(samples)`` when ``max_samples`` picked some); ``screened_out`` lists the line
    numbers of picked conversations the screen left out; ``template`` is the system-prompt style
    they were shown under (``deltafix.calibration.templates``).
    """

    samples: list[torch.Tensor]
    source: str
    max_length: int
    truncated: int = 0
    templated: bool = False
    available: int = 0
    screened_out: tuple[int, ...] = ()
    template: SafetyTemplate = DEFAULT_SAFETY_TEMPLATE

    @cached_property
    def digest(self) -> str:
        """sha256 of the token ids, in order: the data part of the Hessian cache key.

        The ids already reflect the file, the tokenizer, the chat template and ``max_length``,
        and the Hessians depend on nothing else in the data, so equal digests mean equal H.
        """
        h = hashlib.sha256(b"deltafix-calibration-v1")
        for sample in self.samples:
            ids = sample.to(torch.int64).contiguous()
            h.update(len(ids).to_bytes(8, "little"))
            h.update(ids.numpy().tobytes())
        return h.hexdigest()

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.samples)


def evenly_spaced(available: int, wanted: int) -> list[int]:
    """``min(wanted, available)`` indices spread evenly over ``range(available)``, first and last
    included: a sample that covers a data file ordered by topic or source, and the same every run."""
    return torch.linspace(0, available - 1, min(wanted, available)).round().long().tolist()


def load_calibration(
    path: str | Path | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_samples: int | None = None,
    screen: Callable[[list[Conversation]], list[bool]] | None = None,
    template: SafetyTemplate = DEFAULT_SAFETY_TEMPLATE,
) -> CalibrationSet:
    """Read and render a safety JSONL file (None: the built-in set) with ``tokenizer``.

    With ``max_samples``, a file holding more conversations gives that many, evenly spaced through
    it (first and last included): the same file always gives the same sample, and one that is
    sorted by topic still gives every part of it. ``screen`` then says, per picked conversation,
    whether to leave it out (``deltafix.calibration.screening``); ``template`` the system prompts
    the rest are shown under (``deltafix.calibration.templates``).
    """
    if max_length < 1:
        raise InputError(f"max_length must be a positive number of tokens, not {max_length}.")
    if max_samples is not None and max_samples < 1:
        raise InputError(f"max_samples must be a positive number of conversations, not {max_samples}.")
    source = Path(path) if path is not None else SAFETY_CALIBRATION
    conversations = read_conversations(source)
    available = len(conversations)
    if max_samples is not None and available > max_samples:
        conversations = [conversations[i] for i in evenly_spaced(available, max_samples)]
    screened_out: tuple[int, ...] = ()
    if screen is not None:
        drop = screen([conversation for _, conversation in conversations])
        screened_out = tuple(int(where.rpartition(":")[2]) for (where, _), out in zip(conversations, drop) if out)
        conversations = [pair for pair, out in zip(conversations, drop) if not out]
        if not conversations:
            raise InputError(f"{source}: every conversation was screened out; none is left to calibrate on.")
    shown = templated([conversation for _, conversation in conversations], template)
    samples, truncated = [], 0
    for (where, _), conversation in zip(conversations, shown):
        try:
            ids = render(conversation, tokenizer)
        except TemplateError as err:
            raise InputError(f"{where}: the model's chat template rejects this conversation ({err}).") from err
        if not ids:
            raise InputError(f"{where}: the conversation renders to no tokens.")
        if len(ids) > max_length:
            truncated += 1
            ids = ids[:max_length]
        samples.append(torch.tensor(ids, dtype=torch.int64))
    return CalibrationSet(
        samples=samples,
        source=str(source),
        max_length=max_length,
        truncated=truncated,
        templated=bool(tokenizer.chat_template),
        available=available,
        screened_out=screened_out,
        template=template,
    )


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer (and chat template) saved in a checkpoint folder; never runs remote code."""
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load the tokenizer of {folder} ({err}); the folder needs tokenizer files.") from err
