"""The hub pipeline: real ``snapshot_download`` against a hand-built Hub cache, a recording client.

huggingface_hub reads ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, when it is imported (its
``constants`` module), and this process imported it long before any test runs; so each test sets
the environment variables (what a user sets) and the matching constants (what the running library
reads).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import httpx2
import pytest
import torch
from huggingface_hub import ModelCard, constants
from huggingface_hub.hf_api import CommitInfo
from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, filter_repo_objects
from huggingface_hub.utils import TensorInfo as HubTensorInfo
from safetensors.torch import load_file

import deltafix.hub.push
from deltafix.cli import main
from deltafix.errors import OutputError
from deltafix.io.reader import CheckpointReader, read_safetensors_header
from deltafix.io.refs import ALLOW_PATTERNS, IGNORE_PATTERNS, resolve_ref
from deltafix.io.writer import DTYPE_NAMES
from deltafix.methods import get_method
from deltafix.engine.plan import build_plan
from deltafix.hub.preflight import preflight
from deltafix.engine.pipeline import RepairOptions, estimate_peak_bytes
from deltafix.engine.report import REPORT_NAME

SECRET = "hf_secretvalue"
LICENSED_CARD = "---\nlicense: apache-2.0\n---\n\n# the fine-tune\n"


def commit_sha(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def add_to_cache(cache: Path, repo_id: str, source: Path, sha: str, extra: dict[str, str] | None = None) -> None:
    """Lay ``source``'s files out as huggingface_hub does: blobs, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    files = {f.name: f.read_bytes() for f in source.iterdir()}
    files.update({name: text.encode() for name, text in (extra or {}).items()})
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / "main").write_text(sha)


def hub_metadata(folder: Path, shape_change: str | None = None) -> SafetensorsRepoMetadata:
    """What ``HfApi.get_safetensors_metadata`` returns for a repo holding ``folder``'s weights."""
    reader = CheckpointReader(folder)
    files: dict[str, SafetensorsFileMetadata] = {}
    for file in reader.files:
        tensors, metadata = read_safetensors_header(file)
        entries = {}
        for name, info in tensors.items():
            shape = list(info.shape)
            if name == shape_change:
                shape[-1] += 1
            entries[name] = HubTensorInfo(DTYPE_NAMES[info.dtype], shape, (info.offset, info.offset + info.nbytes))
        files[file.name] = SafetensorsFileMetadata(metadata=metadata, tensors=entries)
    weight_map = {n: i.file.name for n, i in reader.tensors.items()}
    return SafetensorsRepoMetadata(metadata=None, sharded=len(files) > 1, weight_map=weight_map,
                                   files_metadata=files)


class RecordingHub:
    """Stand-in for ``HfApi``: serves headers and configs from local folders, records every write."""

    def __init__(self, folders: dict[str, Path], metadata: dict[str, SafetensorsRepoMetadata] | None = None) -> None:
        self.folders = folders
        self.metadata = metadata or {repo: hub_metadata(folder) for repo, folder in folders.items()}
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def get_safetensors_metadata(self, repo_id: str, *, revision: str | None = None) -> SafetensorsRepoMetadata:
        self.calls.append(("get_safetensors_metadata", {"repo_id": repo_id, "revision": revision}))
        return self.metadata[repo_id]

    def hf_hub_download(self, repo_id: str, filename: str, *, revision: str | None = None) -> str:
        self.calls.append(("hf_hub_download", {"repo_id": repo_id, "filename": filename}))
        return str(self.folders[repo_id] / filename)

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, "private": private, "exist_ok": exist_ok}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, commit_message: str | None = None,
                      commit_description: str | None = None, create_pr: bool | None = None,
                      delete_patterns: list[str] | None = None) -> CommitInfo:
        folder = Path(folder_path)
        self.calls.append(("upload_folder", {
            "repo_id": repo_id, "files": sorted(p.name for p in folder.iterdir()),
            "commit_message": commit_message, "commit_description": commit_description,
            "create_pr": create_pr, "delete_patterns": delete_patterns,
        }))
        pr = f"https://huggingface.co/{repo_id}/discussions/1" if create_pr else None
        return CommitInfo(f"https://huggingface.co/{repo_id}/commit/{'0' * 40}", commit_message or "",
                          commit_description or "", "0" * 40, pr_url=pr)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trio: dict[str, Path]) -> dict[str, Any]:
    """A Hub cache with org/P, org/A, org/F (F carrying an apache-2.0 card), offline, a token set."""
    cache = tmp_path / "hf-cache"
    for name in "PAF":
        add_to_cache(cache, f"org/{name}", trio[name], commit_sha(name),
                     {"README.md": LICENSED_CARD} if name == "F" else None)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("DELTAFIX_CACHE", str(tmp_path / "deltafix-cache"))
    client = RecordingHub({f"org/{n}": trio[n] for n in "PAF"})
    monkeypatch.setattr(deltafix.hub.push, "default_client", lambda: client)
    return {"cache": cache, "client": client, "out": tmp_path / "deltafix-cache" / "hub" / "me--fixed"}


def online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


HUB_ARGS = ["hub", "--base", "org/A", "--finetuned", "org/F@main", "--unaligned", "org/P",
            "--method", "resta", "--set", "scale=0.5", "--push", "me/fixed"]


def test_download_repair_upload_offline(hub: dict[str, Any], trio: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["deltafix", *HUB_ARGS, "--private"])  # as the console script sees it
    rc = main()
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err.count("skipped the remote pre-flight") == 1
    client, out = hub["client"], hub["out"]
    assert client.names() == ["create_repo", "upload_folder"]
    assert client.calls[0][1] == {"repo_id": "me/fixed", "private": True, "exist_ok": True}
    upload = client.calls[1][1]
    assert upload["repo_id"] == "me/fixed" and upload["create_pr"] is False
    assert upload["files"] == ["README.md", "config.json", "deltafix_recipe.yaml", "deltafix_report.json",
                               "generation_config.json", "model.safetensors"]
    for stale in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        assert any(fnmatch.fnmatch(stale, p) for p in upload["delete_patterns"]), stale
    assert upload["commit_message"] == f"deltafix {deltafix.__version__}: resta safety repair of org/F"
    assert "me/fixed" in captured.out

    report = json.loads((out / REPORT_NAME).read_text())
    for name in "AFP":
        role = {"A": "aligned", "F": "finetuned", "P": "unaligned"}[name]
        assert report["inputs"][role]["repo_id"] == f"org/{name}"
        assert report["inputs"][role]["revision"] == commit_sha(name)
        assert commit_sha(name) in upload["commit_description"]
    name = "model.layers.1.mlp.down_proj.weight"
    a, f, p = (load_file(str(trio[n] / "model.safetensors"))[name] for n in "AFP")
    torch.testing.assert_close(load_file(str(out / "model.safetensors"))[name], f + 0.5 * (a - p))

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["org/A", "org/F"] and card.data.base_model_relation == "merge"
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert f"deltafix {shlex.join([*HUB_ARGS, '--private'])}" in card.text

    texts = [captured.out, captured.err, repr(client.calls)]
    texts += [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
    assert not any(SECRET in t for t in texts)


def test_preflight_mismatch_stops_before_any_download(hub: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                      trio: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    online(monkeypatch)
    empty = tmp_path / "empty-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty))
    client = hub["client"]
    client.metadata["org/F"] = hub_metadata(trio["F"], shape_change="model.layers.0.self_attn.q_proj.weight")
    rc = main(HUB_ARGS)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == ["error: tensor 'model.layers.0.self_attn.q_proj.weight' has shape [32, 33] in the fine-tune "
                   "but [32, 32] in the aligned model; are both checkpoints of the same architecture?"]
    assert "upload_folder" not in client.names() and "create_repo" not in client.names()
    assert not empty.exists() and not hub["out"].exists()


def test_preflight_numbers_match_the_local_plan(hub: dict[str, Any], trio: dict[str, Path]) -> None:
    local = build_plan(CheckpointReader(trio["A"]), CheckpointReader(trio["F"]))
    result = preflight(hub["client"], str(trio["A"]), "org/F@main")
    weights_f = CheckpointReader(trio["F"]).total_bytes()
    assert result is not None and result.skipped is None
    assert (result.tensors, result.download_bytes, result.peak_bytes) == (
        len(local.tensors), weights_f, estimate_peak_bytes(local, 2))
    both = preflight(hub["client"], "org/A", "org/F")
    assert both is not None and both.download_bytes == weights_f + CheckpointReader(trio["A"]).total_bytes()
    assert preflight(hub["client"], str(trio["A"]), str(trio["F"])) is None


def test_offline_cache_miss_is_one_line(hub: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["hub", "--base", "org/A", "--finetuned", "org/missing", "--method", "resta",
               "--unaligned", "org/P", "--push", "me/fixed"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1] == ("error: org/missing is not in the local Hub cache and HF_HUB_OFFLINE is set; "
                       "download it once online first.")
    assert hub["client"].names() == []


def delta_gate(limit: float):
    """A real (tiny) gate: passes when the repaired delta norm in the report is at most ``limit``."""
    def gate(out: Path) -> tuple[bool, dict[str, Any]]:
        after = json.loads((out / REPORT_NAME).read_text())["totals"]["delta_norm_after"]
        return after <= limit, {"delta_norm_after": after, "limit": limit}
    return gate


def test_failing_gate_blocks_upload(hub: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(deltafix.hub.push, "cli_gate", lambda *args, **kwargs: delta_gate(0.0))
    rc = main([*HUB_ARGS, "--gate"])
    captured = capsys.readouterr()
    assert rc == 1 and captured.out == ""
    assert captured.err.strip().splitlines()[-1].startswith("gate FAILED; nothing was uploaded (pass --force")
    assert hub["client"].names() == []
    report = json.loads((hub["out"] / REPORT_NAME).read_text())
    assert report["gate"]["passed"] is False and report["gate"]["table"]["limit"] == 0.0
    card = ModelCard.load(hub["out"] / "README.md")
    assert "The gate **failed**." in card.text and "| delta_norm_after |" in card.text
    assert card.data.license == "apache-2.0"  # kept when the card is rewritten with the verdict


def test_forced_push_after_failing_gate_opens_pr(hub: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(deltafix.hub.push, "cli_gate", lambda *args, **kwargs: delta_gate(0.0))
    rc = main([*HUB_ARGS, "--gate", "--force", "--create-pr"])
    err = capsys.readouterr().err
    assert rc == 1 and "discussions/1" in err
    create, upload = hub["client"].calls
    assert create[1]["private"] is None and upload[1]["create_pr"] is True
    assert "gate: failed, pushed with --force" in upload[1]["commit_description"]


def test_passing_gate_dry_run_pushes_nothing(hub: dict[str, Any], trio: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    opts = RepairOptions(base="org/A", finetuned="org/F", unaligned="org/P", out=tmp_path / "R", method="resta",
                         params=get_method("resta").params(), progress=False)
    push = deltafix.hub.push.PushOptions("me/fixed", dry_run=True)
    lines: list[str] = []
    result = deltafix.hub.push.run_hub(opts, push, gate_fn=delta_gate(1e9), client=hub["client"], echo=lines.append)
    assert result.gate_passed is True and not result.uploaded and hub["client"].names() == []
    assert lines == result.messages and len(lines) == 1
    assert result.upload.files == sorted(p.name for p in (tmp_path / "R").iterdir())
    assert "gate: passed" in result.upload.commit_description
    rc = main([*HUB_ARGS, "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("dry run: would push") and "  upload model.safetensors" in out
    assert hub["client"].names() == []


def test_push_target_must_be_a_repo_id(hub: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([*HUB_ARGS[:-1], "me/fixed@main"])
    assert rc == 2 and "must be a Hub repo id like org/name" in capsys.readouterr().err
    assert not hub["out"].exists()


def test_an_unknown_safety_template_stops_before_any_download(
        hub: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    online(monkeypatch)
    empty = tmp_path / "empty-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty))
    assert main([*HUB_ARGS, "--safety-template", "aoa"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --safety-template 'aoa' is not one of default, reference."]
    assert hub["client"].calls == [] and not empty.exists() and not hub["out"].exists()


def test_downloads_only_what_a_repair_reads(hub: dict[str, Any]) -> None:
    repo = ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json", "config.json", "tokenizer.json", "tokenizer.model",
            "chat_template.jinja", "README.md", "onnx/model.onnx", "training_args.bin",
            "consolidated.safetensors", "original/params.json", "original/tokenizer.model"]
    kept = set(filter_repo_objects(repo, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))
    assert kept == {"model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json",
                    "tokenizer.json", "tokenizer.model", "chat_template.jinja", "README.md"}
    resolved = resolve_ref("org/A@main")
    assert resolved.revision == commit_sha("A") and resolved.folder.name == commit_sha("A")
    assert resolved.folder.is_relative_to(hub["cache"])


def test_offline_upload_is_refused_in_one_line(hub: dict[str, Any], tmp_path: Path) -> None:
    """The real HfApi refuses every request under HF_HUB_OFFLINE=1 (before any connection)."""
    from huggingface_hub import HfApi

    opts = RepairOptions(base="org/A", finetuned="org/F", unaligned="org/P", out=tmp_path / "R", method="resta",
                         params=get_method("resta").params(), progress=False)
    with pytest.raises(OutputError) as err:
        deltafix.hub.push.run_hub(opts, deltafix.hub.push.PushOptions("me/fixed"), client=HfApi())
    message = str(err.value)
    assert message.startswith("HF_HUB_OFFLINE=1 blocks the upload to me/fixed") and "\n" not in message
    assert str(tmp_path / "R") in message and SECRET not in message
    assert (tmp_path / "R" / "model.safetensors").is_file()


class UnreachableHub(RecordingHub):
    def get_safetensors_metadata(self, repo_id: str, *, revision: str | None = None) -> SafetensorsRepoMetadata:
        raise httpx2.ConnectError("Name or service not known")


def test_unreachable_hub_skips_the_preflight(trio: dict[str, Path]) -> None:
    result = preflight(UnreachableHub({"org/F": trio["F"]}), str(trio["A"]), "org/F")
    assert result is not None and result.skipped is not None and "unreachable" in result.skipped
    assert result.summary().startswith("pre-flight skipped: the Hub is unreachable (ConnectError)")
