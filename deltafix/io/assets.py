"""Copy the non-weight files that make OUT load exactly like F: config, tokenizer, chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from deltafix.errors import OutputError
from deltafix.io.strictjson import parse_json_object

ASSET_NAMES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
CONFIG_NAME = "config.json"
DTYPE_KEYS = ("dtype", "torch_dtype")
"""Where a config names its weights' dtype: transformers 5 writes ``dtype``, older versions ``torch_dtype``."""


def copy_assets(sources: list[Path], out: Path, weights_dtype: torch.dtype | None = None) -> list[str]:
    """Copy each known asset from the first source folder that has it; return the names copied.

    With ``weights_dtype`` (the dtype OUT's weights were written in, when it was chosen rather than
    kept from F) the copied ``config.json`` names that dtype (``state_dtype``).
    """
    copied: list[str] = []
    for name in ASSET_NAMES:
        src = next((folder / name for folder in sources if (folder / name).is_file()), None)
        if src is None:
            continue
        try:
            shutil.copyfile(src, out / name)
            if name == CONFIG_NAME and weights_dtype is not None:
                state_dtype(src, out / name, weights_dtype)
        except OSError as err:
            raise OutputError(f"cannot copy {src} into the output: {err.strerror or err}.") from err
        copied.append(name)
    return copied


def state_dtype(src: Path, config: Path, dtype: torch.dtype) -> None:
    """Rewrite ``config``, the copy of ``src``, so that it names ``dtype`` as the weights' dtype.

    ``from_pretrained(dtype="auto")`` loads the dtype the config names, not the one the files
    hold: a float16 output whose config still said bfloat16 would load as bfloat16. The dtype keys
    the config has are set (those of composite models' sub-configs included), ``dtype`` when it
    has none; a config that already names ``dtype`` stays byte for byte as it was.
    """
    data = parse_json_object(config.read_bytes(), src, "fix or remove that config.json.")
    name = str(dtype).removeprefix("torch.")
    stated = _with_dtype(data, name)
    if not any(key in data for key in DTYPE_KEYS):
        stated[DTYPE_KEYS[0]] = name
    if stated != data:
        config.write_text(json.dumps(stated, indent=2) + "\n")


def _with_dtype(config: dict[str, Any], name: str) -> dict[str, Any]:
    """``config`` with each dtype key holding a name (or null), nested configs' too, set to ``name``."""
    return {key: name if key in DTYPE_KEYS and (value is None or isinstance(value, str))
            else _with_dtype(value, name) if isinstance(value, dict) else value
            for key, value in config.items()}
