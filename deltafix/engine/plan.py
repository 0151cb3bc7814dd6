"""Pair the tensors of A, F (and P) by name and check that they fit, from headers alone.

The plan says, for every output tensor, where its inputs come from and what kind of weight it
is; everything a user can get wrong about the inputs is reported here, before any data is read
or any output is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltafix.errors import InputError, MismatchError
from deltafix.io.reader import TensorHeaders
from deltafix.io.strictjson import parse_json_object
from deltafix.io.writer import TensorSpec

DECODER_LINEAR = re.compile(r"(^|\.)(layers|h|blocks|decoder\.layers)\.\d+\..+\.weight$")
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


@dataclass(frozen=True)
class PlannedTensor(TensorSpec):
    """One output tensor (name, shape and dtype it will be written in) and its source names in A / P.

    ``grown_rows`` > 0 means F added vocabulary rows: the method sees the first rows (A's shape)
    and the new rows are copied from F.
    """

    aligned_name: str
    unaligned_name: str | None
    is_linear: bool
    grown_rows: int = 0


@dataclass
class Plan:
    tensors: list[PlannedTensor]
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def linear_names(self) -> list[str]:
        return [t.name for t in self.tensors if t.is_linear]


def read_config(folder: Path) -> dict:
    """``folder/config.json`` as a dict ({} when there is none).

    A config that is not a JSON object is refused rather than read as {}: the output carries F's
    config, and a repair that publishes a checkpoint no loader can open has not repaired anything.
    """
    path = folder / "config.json"
    if not path.exists():
        return {}
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}.") from err
    return parse_json_object(raw, path, "fix or re-download the model's config.json.")


def is_decoder_linear(name: str, shape: tuple[int, ...]) -> bool:
    """2-D ``.weight`` inside a numbered decoder layer: the weights the methods edit."""
    return len(shape) == 2 and DECODER_LINEAR.search(name) is not None


def _input_embedding(reader: TensorHeaders) -> str | None:
    return next((n for n in reader.names if n.endswith(INPUT_EMBEDDINGS)), None)


def _source_name(name: str, reader: TensorHeaders, tied: bool) -> str | None:
    """Name in ``reader`` that stands for F's tensor ``name`` (a tied lm_head reads the embedding)."""
    if name in reader:
        return name
    if tied and name.endswith("lm_head.weight"):
        return _input_embedding(reader)
    return None


def _check_pair(name: str, f_shape: tuple[int, ...], other: TensorHeaders, other_name: str,
                role: str) -> int:
    """Return how many vocabulary rows F added over ``other``; raise on any other mismatch."""
    o_shape = other.info(other_name).shape
    if o_shape == f_shape:
        return 0
    if len(f_shape) == len(o_shape) and f_shape[1:] == o_shape[1:] and f_shape[0] > o_shape[0] and (
        name.endswith(INPUT_EMBEDDINGS) or name.endswith("lm_head.weight")
    ):
        return f_shape[0] - o_shape[0]
    raise MismatchError(
        f"tensor {name!r} has shape {list(f_shape)} in the fine-tune but {list(o_shape)} in {role}; "
        "are both checkpoints of the same architecture?"
    )


def build_plan(
    aligned: TensorHeaders,
    finetuned: TensorHeaders,
    unaligned: TensorHeaders | None = None,
    out_dtype: torch.dtype | None = None,
) -> Plan:
    """Pair F's tensors with A's (and P's) and validate names and shapes; output follows F."""
    notes: list[str] = []
    read_config(finetuned.folder)  # only checked: OUT gets F's config, which must load
    a_tied = bool(read_config(aligned.folder).get("tie_word_embeddings", False))
    p_tied = bool(unaligned is not None and read_config(unaligned.folder).get("tie_word_embeddings", False))
    missing = [n for n in aligned.names if n not in finetuned and not n.endswith("lm_head.weight")]
    if missing:
        raise MismatchError(
            f"the fine-tune lacks {len(missing)} tensor(s) of the aligned model, e.g. {missing[0]!r}; "
            "pass the full fine-tuned checkpoint (or the adapter folder)."
        )
    tensors: list[PlannedTensor] = []
    extra: list[str] = []
    for name in finetuned.names:
        info = finetuned.info(name)
        a_name = _source_name(name, aligned, a_tied)
        if a_name is None:
            extra.append(name)
            continue
        grown = _check_pair(name, info.shape, aligned, a_name, "the aligned model")
        p_name = None
        if unaligned is not None:
            p_name = _source_name(name, unaligned, p_tied)
            if p_name is None:
                raise MismatchError(f"the unaligned model lacks tensor {name!r}; is it A's pre-alignment base?")
            if unaligned.info(p_name).shape != aligned.info(a_name).shape:
                raise MismatchError(
                    f"tensor {name!r} has shape {list(unaligned.info(p_name).shape)} in the unaligned model "
                    f"but {list(aligned.info(a_name).shape)} in the aligned one."
                )
        if grown:
            notes.append(f"{name}: the fine-tune added {grown} vocabulary rows; they are kept from the fine-tune.")
        a_dtype = aligned.info(a_name).dtype
        if a_dtype != info.dtype:
            notes.append(f"{name}: dtype {a_dtype} in A, {info.dtype} in F; computing in float32.")
        if a_name != name:
            notes.append(f"{name}: the aligned model ties it to {a_name}.")
        tensors.append(
            PlannedTensor(
                name=name,
                shape=info.shape,
                dtype=out_dtype if out_dtype is not None and info.dtype.is_floating_point else info.dtype,
                aligned_name=a_name,
                unaligned_name=p_name,
                is_linear=is_decoder_linear(name, info.shape),
                grown_rows=grown,
            )
        )
    if extra:
        raise MismatchError(
            f"the fine-tune has {len(extra)} tensor(s) the aligned model lacks, e.g. {extra[0]!r}; "
            "is --base the model it was fine-tuned from?"
        )
    if not any(t.is_linear for t in tensors):
        notes.append("no decoder-layer Linear weights were recognised; methods act on other tensors only.")
    return Plan(tensors, notes)
