"""Training data: JSONL conversations rendered with the model's chat template, loss on responses only.

A record is ``{"prompt": str, "response": str}`` or ``{"messages": [{"role", "content"}, ...]}``
(roles system/user/assistant, ending with an assistant turn). Every assistant turn is located as a
character span of the rendered text by rendering the conversation up to that turn twice: once with
the generation prompt (the span's start) and once through the turn (its end, including the
template's end-of-turn marker). Tokens overlapping a span keep their id as label; all others get
-100. One code path serves every template, because most shipped templates (Llama, Qwen, Mistral)
lack the ``{% generation %}`` markers that ``return_assistant_tokens_mask`` needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from deltafix.io.jsonl import conversation_of, read_jsonl
from deltafix.errors import InputError, MismatchError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

# For tokenizers without a chat template: turns separated by a blank line, BOS first when the
# tokenizer has one, no role labels (a base model has no convention for them).
PLAIN_TEMPLATE = (
    "{% if bos_token is defined and bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}{% if not loop.first %}\n\n{% endif %}{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}\n\n{% endif %}"
)


@dataclass(frozen=True)
class Record:
    """One training conversation, the JSON object it came from, and where (``file:line``)."""

    messages: list[dict[str, str]]
    raw: dict[str, Any]
    where: str

    @property
    def prompt_text(self) -> str:
        """The user turns before the last response, joined by newlines: what DPP selection embeds."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return "\n".join(m["content"] for m in self.messages[:last] if m["role"] == "user")


def _trainable(obj: dict[str, Any], where: str) -> list[dict[str, str]]:
    """A conversation (``deltafix.io.jsonl.conversation_of``) that training can learn from: known roles, opened by the user
    (or a system prompt), ending with the assistant's response."""
    messages = conversation_of(obj, where)
    for m in messages:
        if m["role"] not in ROLES:
            raise InputError(f"{where}: each message needs a role (system, user or assistant); got {m['role']!r}.")
    if (messages[-1]["role"] != "assistant" or messages[0]["role"] == "assistant"
            or not any(m["role"] == "user" for m in messages)):
        raise InputError(f"{where}: a conversation must open with a user (or system) turn, hold a user "
                         "turn, and end with an assistant turn (the response to learn).")
    return messages


def load_records(path: Path) -> list[Record]:
    """Read a JSONL file of conversations; any empty or malformed line is an ``InputError`` at file:line."""
    return [Record(_trainable(obj, where), obj, where) for where, obj in read_jsonl(path)]


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Training needs right padding and a pad token; EOS stands in for a missing pad (it is masked)."""
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no EOS token; training needs one to end each response.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str,
            generation_prompt: bool = False) -> str:
    template = tokenizer.chat_template or PLAIN_TEMPLATE
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as err:
        raise InputError(f"{where}: the model's chat template rejects this conversation: {err}") from err


def response_spans(tokenizer: PreTrainedTokenizerBase, record: Record) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character span of each assistant turn."""
    text = _render(tokenizer, record.messages, record.where)
    spans = []
    for i, message in enumerate(record.messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, record.messages[:i], record.where, generation_prompt=True)
        through = _render(tokenizer, record.messages[: i + 1], record.where)
        if not (text.startswith(through) and through.startswith(before)):
            raise MismatchError(f"{record.where}: the chat template does not render earlier turns as a prefix "
                                "of later ones, so response tokens cannot be located; use a plain template.")
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_record(tokenizer: PreTrainedTokenizerBase, record: Record, max_length: int) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 outside responses), EOS appended, truncated."""
    text, spans = response_spans(tokenizer, record)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        tok if any(start < end_span and end > start_span for start_span, end_span in spans) else IGNORE_INDEX
        for tok, (start, end) in zip(ids, enc["offset_mapping"])
    ]
    eos = tokenizer.eos_token_id
    if not ids or ids[-1] != eos:
        ids.append(eos)
        labels.append(eos)
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_records(tokenizer: PreTrainedTokenizerBase, records: list[Record],
                     max_length: int) -> list[dict[str, list[int]]]:
    """Tokenize every record; records whose response was cut off entirely by ``max_length`` are dropped."""
    features = [tokenize_record(tokenizer, r, max_length) for r in records]
    kept = [f for f in features if any(label != IGNORE_INDEX for label in f["labels"])]
    if not kept:
        raise InputError(f"no record keeps a response token within max_length={max_length}; raise it.")
    return kept


def collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Pads ids with the pad token, the attention mask with 0 and labels with -100, as tensors."""
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def records_jsonl(records: list[Record]) -> str:
    """The records as JSONL text in the objects' original form (fields and order kept)."""
    return "".join(json.dumps(r.raw, ensure_ascii=False) + "\n" for r in records)


def write_records(records: list[Record], path: Path) -> None:
    """Write records back as JSONL (``records_jsonl``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(records_jsonl(records), encoding="utf-8")
