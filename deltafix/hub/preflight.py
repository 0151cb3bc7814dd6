"""Check that Hub inputs fit together from their safetensors headers, before any weight download.

``HfApi.get_safetensors_metadata`` reads only the headers of a repo's shards (a few kB each), so
names, shapes and dtypes of A, F (and P) can be paired by the same ``build_plan`` a repair uses,
and a wrong ``--base`` stops in seconds instead of after downloading two models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from deltafix.errors import InputError
from deltafix.io.pickled import is_pickle_only
from deltafix.io.reader import SAFETENSORS_DTYPES, CheckpointReader, TensorHeaders, TensorInfo
from deltafix.io.refs import parse_hub_ref
from deltafix.engine.plan import build_plan
from deltafix.engine.pipeline import estimate_peak_bytes


class HeaderSource(Protocol):
    """The two ``HfApi`` calls a pre-flight makes."""

    def get_safetensors_metadata(self, repo_id: str, *, revision: str | None = None) -> Any: ...

    def hf_hub_download(self, repo_id: str, filename: str, *, revision: str | None = None) -> str: ...


@dataclass
class Preflight:
    """What the headers say: tensors to repair, weight bytes a cold cache downloads, peak memory."""

    tensors: int = 0
    download_bytes: int = 0
    peak_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    def summary(self) -> str:
        if self.skipped:
            return f"pre-flight skipped: {self.skipped}; the repair validates the inputs after download."
        return (f"pre-flight: {self.tensors} tensors pair up; about {_size(self.download_bytes)} of weights "
                f"to download (less if cached), estimated peak memory {_size(self.peak_bytes)}.")


def _size(n: int) -> str:
    """Decimal units, as the Hub shows file sizes."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class RemoteCheckpoint:
    """Header-only view of a Hub checkpoint: a ``TensorHeaders``, the part of a reader that planning uses.

    ``folder`` holds the repo's ``config.json`` (fetched alone) so tied embeddings are read the same
    way as for a local checkpoint.
    """

    def __init__(self, repo_id: str, folder: Path, metadata: Any) -> None:
        self.folder = folder
        self.tensors: dict[str, TensorInfo] = {}
        for file, header in metadata.files_metadata.items():
            for name, info in header.tensors.items():
                dtype = SAFETENSORS_DTYPES.get(info.dtype)
                if dtype is None:
                    raise InputError(f"{repo_id}: tensor {name!r} has dtype {info.dtype}, which deltafix cannot read.")
                start, _ = info.data_offsets
                self.tensors[name] = TensorInfo(name, tuple(info.shape), dtype, Path(file), start, start)

    @property
    def names(self) -> list[str]:
        return sorted(self.tensors, key=lambda n: (str(self.tensors[n].file), self.tensors[n].offset))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _remote(client: HeaderSource, ref: str, repo_id: str, revision: str | None) -> RemoteCheckpoint | str:
    """The header view of one Hub ref, or the reason it cannot be pre-flighted."""
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        NotASafetensorsRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        metadata = client.get_safetensors_metadata(repo_id, revision=revision)
        config = Path(client.hf_hub_download(repo_id, "config.json", revision=revision))
    except (OfflineModeIsEnabled, httpx2.TransportError) as err:
        return f"the Hub is unreachable ({type(err).__name__}); inputs come from the local Hub cache"
    except NotASafetensorsRepoError:
        return f"{ref} has no model.safetensors or index (an adapter or pickle weights)"
    except EntryNotFoundError:
        return f"{ref} has no config.json"
    except RevisionNotFoundError as err:
        raise InputError(f"{ref}: the repository has no revision {revision!r}.") from err
    except RepositoryNotFoundError as err:
        raise InputError(f"{ref}: no such Hub repository, or you lack access (log in with `hf auth login`).") from err
    except HfHubHTTPError as err:
        raise InputError(f"cannot read the headers of {ref}: {str(err).splitlines()[0]}") from err
    return RemoteCheckpoint(repo_id, config.parent, metadata)


def preflight(client: HeaderSource, base: str, finetuned: str, unaligned: str | None = None,
              allow_pickle: bool = False) -> Preflight | None:
    """Pair A, F (and P) from headers alone; raises ``MismatchError`` exactly as a repair would.

    Local refs are read from disk (headers only); Hub refs through ``client``. Without any Hub ref
    there is nothing to save and the result is ``None``: the repair validates by itself.
    """
    refs = {"aligned": base, "finetuned": finetuned, "unaligned": unaligned}
    views: dict[str, TensorHeaders] = {}
    download, remote = 0, False
    for role, ref in refs.items():
        if ref is None:
            continue
        hub = parse_hub_ref(ref)
        if hub is None:
            if allow_pickle and is_pickle_only(Path(ref).expanduser()):
                return Preflight(skipped=f"{ref} has pickle weights, checked as they are converted")
            views[role] = CheckpointReader(Path(ref).expanduser())
            continue
        view = _remote(client, ref, *hub)
        if isinstance(view, str):
            return Preflight(skipped=view)
        views[role] = view
        download += view.total_bytes()
        remote = True
    if not remote:
        return None
    plan = build_plan(views["aligned"], views["finetuned"], views.get("unaligned"))
    return Preflight(len(plan.tensors), download, estimate_peak_bytes(plan, len(views)), plan.notes)
