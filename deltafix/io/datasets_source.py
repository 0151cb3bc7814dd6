"""``hf:`` data: a Hugging Face dataset read as the records a JSONL data file gives.

Every data argument (``--safety-data``, ``--utility-data``, ``--harmful``, ``--benign``,
``--utility``, tune prompts, training data) is a JSONL file by default. One written
``hf:SOURCE[@REVISION][:SPLIT][#FIELD=COLUMN,...]`` is read through the ``datasets`` library
instead, an optional extra (``pip install 'deltafix[datasets]'``). ``deltafix.io.jsonl`` hands
such an argument here, so every reader of data takes it and checks its records as it checks a
file's lines.

- SOURCE: a local folder, taken first when it exists (as ``load_dataset`` does): one written by
  ``save_to_disk`` (read with ``load_from_disk``) or one of data files ``load_dataset`` reads
  (JSON lines, CSV, parquet...); else a Hub id ``org/name``. A Hub dataset is fetched only
  because the user named it, under the library's own offline switches (``HF_HUB_OFFLINE``,
  ``HF_DATASETS_OFFLINE``); ``@REVISION`` pins its commit, tag or branch.
- SPLIT: ``train`` by default, or the only split there is.
- ``#FIELD=COLUMN,...``: the record field FIELD (``prompt``, ``response``...) is read from column
  COLUMN; ``--columns`` gives this mapping to each ``hf:`` argument of a command that has none.

A record is a row as a dict, mapped columns renamed; it is named ``hf:... row N`` in errors (N
counts from 0, as the dataset's index does). ``describe_dataset`` is what the report and recipe
record: the id, split, resolved Hub commit, the library's fingerprint and the sha256 of the
records as loaded, so a rerun can refuse a dataset that changed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from deltafix.env import progress_shown
from deltafix.errors import InputError, OptionError, reason

Record = dict[str, Any]

PREFIX = "hf:"
FIELDS = ("prompt", "response", "messages", "answer", "text", "category", "style")
"""Record fields a column can be mapped to: those the data readers look for."""
DEFAULT_SPLIT = "train"
INSTALL = "pip install 'deltafix[datasets]'"
SAVED_MARKERS = ("dataset_dict.json", "state.json")
"""Files ``save_to_disk`` writes into a ``DatasetDict`` or a ``Dataset`` folder."""


@dataclass(frozen=True)
class DatasetRef:
    """One parsed ``hf:`` argument; ``text`` is the argument as given."""

    text: str
    source: str
    local: bool
    revision: str | None
    split: str | None
    columns: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class DatasetDigest:
    """What the report and recipe record of an ``hf:`` argument: ``id`` (Hub id or local folder),
    the split read, the Hub commit it resolved to (None for a local folder), the library's
    fingerprint of the table and the sha256 of the records as deltafix read them."""

    id: str
    split: str | None
    revision: str | None
    fingerprint: str | None
    sha256: str

    def recipe_fields(self) -> dict[str, str | None]:
        """The ``RecipeData`` fields besides path and sha256."""
        return {"dataset": self.id, "split": self.split, "revision": self.revision, "fingerprint": self.fingerprint}


def is_dataset_ref(value: object) -> bool:
    """Whether a data argument (a str or the ``Path`` a flag made of it) names an ``hf:`` dataset."""
    return str(value).startswith(PREFIX)


def parse_dataset_ref(text: str) -> DatasetRef:
    """Split ``hf:SOURCE[@REVISION][:SPLIT][#FIELD=COLUMN,...]`` into its parts.

    The split is what follows the last ``:`` when it holds no ``/``; a revision is read only on a
    Hub id, since a local path may hold ``@``.
    """
    body, has_columns, mapping = text.removeprefix(PREFIX).partition("#")
    columns = parse_columns(mapping) if has_columns else ()
    split = None
    head, colon, tail = body.rpartition(":")
    if colon and "/" not in tail:
        if not tail:
            raise OptionError(f"{text}: the split after ':' is empty; write {PREFIX}SOURCE:SPLIT or drop the ':'.")
        body, split = head, tail
    if not body:
        raise OptionError(f"{text}: name a dataset, {PREFIX}org/name[:split] or {PREFIX}/local/folder[:split].")
    local = body.startswith(("/", ".", "~")) or Path(body).expanduser().is_dir()
    revision = None
    if not local and "@" in body:
        body, revision = body.rsplit("@", 1)
        if not body or not revision:
            raise OptionError(f"{text}: write a pinned Hub dataset as {PREFIX}org/name@revision[:split].")
    return DatasetRef(text, body, local, revision, split, columns)


def parse_columns(text: str) -> tuple[tuple[str, str], ...]:
    """``prompt=instruction,response=output`` as ``(field, column)`` pairs; FIELD must be in ``FIELDS``."""
    pairs: dict[str, str] = {}
    for item in text.split(","):
        field, equals, column = (part.strip() for part in item.partition("="))
        if not equals or field not in FIELDS or not column:
            raise OptionError(f"column mapping {item.strip()!r} must be FIELD=COLUMN with FIELD one of "
                              f"{', '.join(FIELDS)}, e.g. prompt=instruction.")
        if field in pairs:
            raise OptionError(f"column mapping {text!r} maps {field} twice; give each field one column.")
        pairs[field] = column
    return tuple(pairs.items())


def with_columns(columns: str | Mapping[str, str] | None, *sources: Any) -> tuple[Any, ...]:
    """A command's data arguments (paths, ``hf:`` arguments, None, prompt lists), the ``--columns``
    mapping added to each ``hf:`` one that has no mapping of its own; a mapping that no argument
    takes is refused rather than ignored."""
    if not columns:
        return sources
    pairs = parse_columns(columns if isinstance(columns, str) else ",".join(f"{k}={v}" for k, v in columns.items()))
    suffix = "#" + ",".join(f"{field}={column}" for field, column in pairs)
    takes = [isinstance(value, (str, Path)) and is_dataset_ref(value) and "#" not in str(value) for value in sources]
    if not any(takes):
        raise OptionError(f"--columns maps the columns of {PREFIX} data, and this command reads none without a "
                          f"mapping of its own; pass e.g. --utility-data {PREFIX}org/name, or drop --columns.")
    return tuple(f"{value}{suffix}" if take else value for value, take in zip(sources, takes))


def read_dataset(text: str, what: str) -> list[tuple[str, Record]]:
    """``(hf:... row N, record)`` for every row of the dataset an ``hf:`` argument names."""
    return _load(parse_dataset_ref(text), what)[1]


def describe_dataset(text: str, what: str) -> DatasetDigest:
    """Load the dataset an ``hf:`` argument names and say what was read (``DatasetDigest``)."""
    digest, _ = _load(parse_dataset_ref(text), what)
    return digest


def records_sha256(records: list[tuple[str, Record]]) -> str:
    """sha256 of the records, one canonical JSON line each (keys sorted): what the readers saw,
    independent of the table's storage and of the library's cache."""
    digest = hashlib.sha256()
    for _, record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _load(ref: DatasetRef, what: str) -> tuple[DatasetDigest, list[tuple[str, Record]]]:
    datasets = _library(ref)
    folder = Path(ref.source).expanduser()
    commit = None
    with _bars(datasets):
        try:
            if ref.local and any((folder / name).is_file() for name in SAVED_MARKERS):
                loaded = datasets.load_from_disk(str(folder))
            else:
                builder = datasets.load_dataset_builder(str(folder) if ref.local else ref.source,
                                                        revision=ref.revision)
                builder.download_and_prepare()
                loaded = builder.as_dataset()
                commit = None if ref.local else builder.hash  # a Hub dataset's module hash is its commit
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
            raise InputError(f"cannot read {what} {ref.text}: {reason(err)}.") from err
    dataset, split = _split(ref, loaded, datasets, what)
    records = _records(ref, dataset, what)
    fingerprint = getattr(dataset, "_fingerprint", None)  # the library's own table identity; no public name
    return DatasetDigest(str(folder.resolve()) if ref.local else ref.source, split, commit, fingerprint,
                         records_sha256(records)), records


def _library(ref: DatasetRef) -> ModuleType:
    """The ``datasets`` module, or one line that says how to install it."""
    try:
        import datasets
    except ImportError as err:
        raise InputError(f"reading {ref.text} needs the datasets library, an optional extra: {INSTALL}.") from err
    return datasets


@contextmanager
def _bars(datasets: ModuleType) -> Iterator[None]:
    """The library's progress bars only where deltafix shows its own (a terminal, no ``--json``):
    they do not check for a terminal themselves and would leak into piped logs."""
    hide = datasets.is_progress_bar_enabled() and not (progress_shown() and sys.stderr.isatty())
    if hide:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if hide:
            datasets.enable_progress_bars()


def _split(ref: DatasetRef, loaded: Any, datasets: ModuleType, what: str) -> tuple[Any, str | None]:
    """The split asked for (default ``train``, or the only one) and its name."""
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        name = ref.split or (DEFAULT_SPLIT if DEFAULT_SPLIT in names or len(names) != 1 else names[0])
        if name not in names:
            raise InputError(f"{what} {ref.text} has no split {name!r}; its splits: {', '.join(names)} "
                             f"({PREFIX}SOURCE:SPLIT).")
        return loaded[name], name
    saved = None if loaded.split is None else str(loaded.split)
    if ref.split is not None and ref.split != saved:
        held = f"split {saved!r} only" if saved else "no splits"
        raise InputError(f"{what} {ref.text} has no split {ref.split!r}: it was saved as one dataset with "
                         f"{held}; drop ':{ref.split}'.")
    return loaded, saved


def _records(ref: DatasetRef, dataset: Any, what: str) -> list[tuple[str, Record]]:
    """Each row as a record, every mapped column renamed to its field (replacing a column of that name)."""
    columns = dict(ref.columns)
    for field, column in columns.items():
        if column not in dataset.column_names:
            raise InputError(f"{what} {ref.text} has no column {column!r} (mapped to {field}); its columns: "
                             f"{', '.join(dataset.column_names)}.")
    renamed = set(columns) | set(columns.values())
    records = []
    for index, row in enumerate(dataset):
        record = {key: value for key, value in row.items() if key not in renamed}
        record.update({field: row[column] for field, column in columns.items()})
        records.append((f"{ref.text} row {index}", record))
    if not records:
        raise InputError(f"{what} {ref.text} holds no records.")
    return records
