"""Turn what the user typed for a model into a local folder.

A ref is a local folder path, or a Hub repo id ``org/name`` optionally pinned as
``org/name@revision``; Hub refs resolve through ``huggingface_hub.snapshot_download``, which
honours ``HF_HUB_OFFLINE`` and the local cache. Only what a repair reads is fetched, from the repo
root: safetensors weights, JSON configs and indexes, tokenizer files and the model card (for its
license). Pickle weights (``*.bin``), Mistral-style ``consolidated*`` duplicates and subfolders
(``original/``, ``onnx/``) are never downloaded, so a repo that has several formats costs one copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from deltafix.errors import InputError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "README.md"]
IGNORE_PATTERNS = ["*/*", "consolidated*", "*.bin.index.json"]


@dataclass(frozen=True)
class ResolvedRef:
    """A model input as resolved: the user's text, the local folder, and the Hub commit sha if any."""

    ref: str
    folder: Path
    repo_id: str | None = None
    revision: str | None = None


def parse_hub_ref(ref: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; ``None`` when ``ref`` is a local path or no Hub id."""
    if Path(ref).expanduser().exists() or not HUB_ID.match(ref):
        return None
    repo_id, _, revision = ref.partition("@")
    return repo_id, revision or None


def hub_offline() -> bool:
    """Whether huggingface_hub runs offline (``HF_HUB_OFFLINE=1``, read by it once at import)."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def resolve_ref(ref: str) -> ResolvedRef:
    """Local folders win; otherwise a string shaped like ``org/name[@rev]`` is fetched from the Hub."""
    path = Path(ref).expanduser()
    if path.exists():
        return ResolvedRef(ref, path)
    hub = parse_hub_ref(ref)
    if hub is None:
        raise InputError(f"{ref} does not exist (neither a local folder nor a Hub id like org/name).")
    return _download(ref, *hub)


def _download(ref: str, repo_id: str, revision: str | None) -> ResolvedRef:
    """Fetch (or find in the cache) the snapshot.

    ``snapshot_download`` returns ``<cache>/models--org--name/snapshots/<commit sha>`` whether it
    downloaded or (offline) followed ``refs/<revision>``, so the folder name is the commit sha even
    when the user named a branch or tag.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                         ignore_patterns=IGNORE_PATTERNS))
    except IncompleteSnapshotError as err:
        raise InputError(f"{ref} is only partly in the Hub cache; download it again with network access.") from err
    except LocalEntryNotFoundError as err:
        if hub_offline():
            raise InputError(
                f"{ref} is not in the local Hub cache and HF_HUB_OFFLINE is set; download it once online first."
            ) from err
        raise InputError(f"{ref} is not a local folder, the Hub is unreachable and it is not in the cache.") from err
    except RevisionNotFoundError as err:
        raise InputError(f"{ref}: the repository has no revision {revision!r}.") from err
    except RepositoryNotFoundError as err:
        raise InputError(f"{ref}: no such Hub repository, or you lack access (log in with `hf auth login`).") from err
    except (HfHubHTTPError, OSError) as err:
        raise InputError(f"cannot download {ref}: {str(err).splitlines()[0]}") from err
    return ResolvedRef(ref, folder, repo_id=repo_id, revision=folder.name)
