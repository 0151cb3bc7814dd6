"""Turn what the user typed for a model into a local folder.

A ref is a local folder path, or a Hub repo id ``org/name`` optionally pinned as
``org/name@revision``; Hub refs resolve through ``huggingface_hub.snapshot_download`` (which
honours ``HF_HUB_OFFLINE`` and the local cache) and download only weights and small configs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from deltafix.errors import InputError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "README.md"]


@dataclass(frozen=True)
class ResolvedRef:
    """A model input as resolved: the user's text, the local folder, and the Hub revision if any."""

    ref: str
    folder: Path
    repo_id: str | None = None
    revision: str | None = None


def resolve_ref(ref: str) -> ResolvedRef:
    """Local folders win; otherwise a string shaped like ``org/name[@rev]`` is fetched from the Hub."""
    path = Path(ref).expanduser()
    if path.exists():
        return ResolvedRef(ref, path)
    if not HUB_ID.match(ref):
        raise InputError(f"{ref} does not exist (neither a local folder nor a Hub id like org/name).")
    repo_id, _, revision = ref.partition("@")
    return _download(ref, repo_id, revision or None)


def _download(ref: str, repo_id: str, revision: str | None) -> ResolvedRef:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError as err:
        raise InputError(
            f"{ref} is not a local folder and is not in the Hub cache (offline or unreachable)."
        ) from err
    except RepositoryNotFoundError as err:
        raise InputError(f"{ref}: no such Hub repository, or you lack access (log in with `hf auth login`).") from err
    except (HfHubHTTPError, OSError) as err:
        raise InputError(f"cannot download {ref}: {err}") from err
    return ResolvedRef(ref, folder, repo_id=repo_id, revision=folder.name)
