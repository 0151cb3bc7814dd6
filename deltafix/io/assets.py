"""Copy the non-weight files that make OUT load exactly like F: config, tokenizer, chat template,
processor configs, license files and the custom code that ``auto_map`` points to.

Every file is copied byte for byte and nothing copied is ever imported or run: custom code is
data here, which the user reviews and loads with ``trust_remote_code=True`` (the report and the
model card say when that is needed).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from deltafix.errors import InputError, OutputError
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
    "preprocessor_config.json",
    "processor_config.json",
)
CONFIG_NAME = "config.json"
DTYPE_KEYS = ("dtype", "torch_dtype")
"""Where a config names its weights' dtype: transformers 5 writes ``dtype``, older versions ``torch_dtype``."""
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")
"""The files whose ``auto_map`` makes transformers import a module of the checkpoint's folder."""
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "NOTICE", "USE_POLICY")
CODE_SUFFIX = ".py"
OTHER_REPO = "--"
"""``org/repo--module.Class``: the module lives in another Hub repository."""
_MODULE = re.compile(r"[A-Za-z_]\w*")


@dataclass
class CopiedAssets:
    """What ``copy_assets`` put into OUT, for the report and the model card."""

    names: list[str] = field(default_factory=list)
    auto_map: list[str] = field(default_factory=list)
    """Every class reference of the copied files' ``auto_map`` entries, sorted."""
    code: list[str] = field(default_factory=list)
    """The Python files copied because an ``auto_map`` is present."""

    def report_entry(self) -> dict[str, Any]:
        """``{"custom_code": ...}`` for the report's ``output`` when OUT has an ``auto_map``, else ``{}``
        (so a model without custom code gets the same report as before)."""
        if not self.auto_map:
            return {}
        local = sorted({_module(ref) for ref in self.auto_map if OTHER_REPO not in ref})
        return {"custom_code": {
            "auto_map": list(self.auto_map),
            "files": list(self.code),
            "other_repos": sorted({ref.split(OTHER_REPO, 1)[0] for ref in self.auto_map if OTHER_REPO in ref}),
            "missing": [name for name in local if name not in self.code],
        }}


def copy_assets(sources: list[Path], out: Path, weights_dtype: torch.dtype | None = None) -> CopiedAssets:
    """Copy each known asset from the first source folder that has it; return what was copied.

    With ``weights_dtype`` (the dtype OUT's weights were written in, when it was chosen rather than
    kept from F) the copied ``config.json`` names that dtype (``state_dtype``). License files come
    as one set from the first source that has any, so OUT never mixes two models' terms. When a
    copied config has an ``auto_map``, every top-level ``*.py`` of the folder it came from is
    copied too: transformers resolves a custom module's relative imports to sibling files of that
    folder, and copying them all covers those imports without reading (let alone running) the
    code; an extra unused file costs nothing. Modules in other repositories (``repo--module.Class``)
    are recorded, never fetched.
    """
    copied = CopiedAssets()
    code_from: list[Path] = []
    for name in ASSET_NAMES:
        found = next(((folder, folder / name) for folder in sources if (folder / name).is_file()), None)
        if found is None:
            continue
        folder, src = found
        _copy(folder, src, out / name)
        if name == CONFIG_NAME and weights_dtype is not None:
            try:
                state_dtype(src, out / name, weights_dtype)
            except OSError as err:
                raise OutputError(f"cannot write {out / name}: {err.strerror or err}.") from err
        copied.names.append(name)
        if name in AUTO_MAP_FILES:
            refs = auto_map_references(src)
            copied.auto_map = sorted(set(copied.auto_map) | set(refs))
            if refs and folder not in code_from:
                code_from.append(folder)
    license_folder = next((folder for folder in sources if _matches(folder, _is_license)), None)
    extra = [(license_folder, src) for src in _matches(license_folder, _is_license)] if license_folder else []
    code = [(folder, src) for folder in code_from for src in _matches(folder, _is_code)]
    for folder, src in extra + code:
        if (out / src.name).exists():
            continue
        _copy(folder, src, out / src.name)
        copied.names.append(src.name)
        if src.suffix == ".py":
            copied.code.append(src.name)
    copied.code.sort()
    return copied


def auto_map_references(config: Path) -> list[str]:
    """The class references (``module.Class`` or ``repo--module.Class``) of ``config``'s ``auto_map``.

    Values are strings or, for tokenizers, ``[slow, fast]`` pairs with ``null`` for a missing one;
    older tokenizer configs hold the pair itself. The file is parsed strictly: a config naming
    ``auto_map`` twice could show deltafix one module and transformers another.
    """
    data = parse_json_object(config.read_bytes(), config, "fix or remove that file.")
    entries = data.get("auto_map")
    values = entries.values() if isinstance(entries, dict) else [entries]
    refs: set[str] = set()
    for value in values:
        refs.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str))
    return sorted(refs)


def _module(reference: str) -> str:
    """The file a local class reference's module lives in; a name that is no plain module name is
    kept as written (it can never be present, so the report lists it as missing)."""
    module = reference.rsplit(".", 1)[0]
    return f"{module}.py" if _MODULE.fullmatch(module) else reference


def _is_license(name: str) -> bool:
    """``LICENSE``, ``licence.txt``, ``NOTICE.md``, ``USE_POLICY.md``...: repositories vary the case."""
    return name.upper().startswith(LICENSE_PREFIXES)


def _is_code(name: str) -> bool:
    return name.endswith(CODE_SUFFIX)


def _matches(folder: Path, keep: Callable[[str], bool]) -> list[Path]:
    """The files at ``folder``'s top level whose names ``keep`` accepts, sorted (folders never)."""
    return sorted(p for p in folder.iterdir() if keep(p.name) and p.is_file())


def _copy(folder: Path, src: Path, dst: Path) -> None:
    """Copy ``src`` byte for byte, refused if it is a link to a file outside ``folder``.

    A link out of an input folder would make deltafix copy (and ``hub`` upload) any file the user
    can read. In a Hub cache snapshot every file links to ``../../blobs/<sha256>``, so that
    repository's ``blobs`` folder counts as inside, as it does for the weights.
    """
    roots = [folder.resolve()]
    if roots[0].parent.name == "snapshots":
        roots.append(roots[0].parent.parent / "blobs")
    if not any(src.resolve().is_relative_to(root) for root in roots):
        raise InputError(f"{src} links to a file that lies outside {folder}; a checkpoint may only use files "
                         "inside its folder, so copy the file into it.")
    try:
        shutil.copyfile(src, dst)
    except OSError as err:
        raise OutputError(f"cannot copy {src} into the output: {err.strerror or err}.") from err


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
