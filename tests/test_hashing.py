"""Input hashes for the report: the Hub cache's blob names are used as they are, other files hashed."""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import pytest

from deltafix.io.hashing import file_sha256, hub_blob_sha256, sha256_file


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTAFIX_CACHE", str(tmp_path / "cache"))


def test_hub_snapshot_link_is_named_by_its_sha256(tmp_path: Path) -> None:
    data = os.urandom(4096)
    blob = tmp_path / "models--org--m" / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    link = tmp_path / "models--org--m" / "snapshots" / "abc" / "model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    assert hub_blob_sha256(link) == blob.name == file_sha256(link) == sha256_file(link)


def test_other_files_and_links_are_hashed(tmp_path: Path) -> None:
    data = os.urandom(4096)
    plain = tmp_path / "model.safetensors"
    plain.write_bytes(data)
    git_blob = tmp_path / "blobs" / hashlib.sha1(data).hexdigest()  # small files: git sha1 names
    git_blob.parent.mkdir()
    git_blob.write_bytes(data)
    link = tmp_path / "config.json"
    link.symlink_to(git_blob)
    for path in (plain, link):
        assert hub_blob_sha256(path) is None
        assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_a_file_longer_than_one_chunk_hashes_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltafix.io import hashing

    monkeypatch.setattr(hashing, "CHUNK", mmap.ALLOCATIONGRANULARITY)
    data = os.urandom(4 * mmap.ALLOCATIONGRANULARITY + 500)  # four full chunks and a short last one
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    path.write_bytes(b"")
    assert sha256_file(path) == hashlib.sha256(b"").hexdigest()


def test_files_hashed_on_many_threads_are_all_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from deltafix.io import hashing

    monkeypatch.setattr(hashing, "RACY_NS", 0)  # the files are seconds old at most: remember them anyway

    files = []
    for i in range(24):
        files.append(tmp_path / f"model-{i:05d}.safetensors")
        files[-1].write_bytes(os.urandom(1024 + i))
    with ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(file_sha256, files))
    assert digests == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    memo = hashing._load_memo()
    assert [memo.get(hashing._memo_key(f)) for f in files] == digests


def test_a_same_size_rewrite_with_the_old_mtime_is_hashed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Size and mtime can be kept on purpose (``touch -d``, ``rsync -t``) or by chance (one clock
    tick); the inode's ctime cannot, so the memo does not return the old content's hash."""
    from deltafix.io import hashing

    monkeypatch.setattr(hashing, "RACY_NS", 0)
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"a" * 4096)
    old = path.stat()
    assert file_sha256(path) == hashlib.sha256(b"a" * 4096).hexdigest()
    assert hashing._memo_key(path) in hashing._load_memo()
    with path.open("r+b") as fh:  # same inode, same size
        fh.write(b"b" * 4096)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert file_sha256(path) == hashlib.sha256(b"b" * 4096).hexdigest()


def test_a_file_changed_just_now_is_not_remembered(tmp_path: Path) -> None:
    """Within RACY_NS of its last change a file might change again inside one timestamp tick."""
    from deltafix.io import hashing

    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(1024))
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert hashing._memo_key(path) not in hashing._load_memo()
