"""Copy the non-weight files that make OUT load exactly like F: config, tokenizer, chat template."""

from __future__ import annotations

import shutil
from pathlib import Path

from deltafix.errors import OutputError

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


def copy_assets(sources: list[Path], out: Path) -> list[str]:
    """Copy each known asset from the first source folder that has it; return the names copied."""
    copied: list[str] = []
    for name in ASSET_NAMES:
        src = next((folder / name for folder in sources if (folder / name).is_file()), None)
        if src is None:
            continue
        try:
            shutil.copyfile(src, out / name)
        except OSError as err:
            raise OutputError(f"cannot copy {src} into the output: {err.strerror or err}.") from err
        copied.append(name)
    return copied
