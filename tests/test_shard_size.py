"""``--out-shard-size``: K/M/B/T as mergekit reads them, KB.. and KiB.. as bytes, nothing below 1MB."""

from __future__ import annotations

import pytest

from deltafix.errors import OptionError
from deltafix.io.writer import parse_size


@pytest.mark.parametrize(("text", "size"), [
    ("5B", 5 * 10**9),
    ("5b", 5 * 10**9),
    ("0.5B", 5 * 10**8),
    ("500M", 5 * 10**8),
    ("2000K", 2 * 10**6),
    ("1T", 10**12),
    ("5GB", 5 * 10**9),
    ("5 gb", 5 * 10**9),
    ("500MB", 5 * 10**8),
    ("1MB", 10**6),
    ("977KiB", 977 * 2**10),
    ("2GiB", 2 * 2**30),
    ("3mib", 3 * 2**20),
    ("1TiB", 2**40),
    ("1000000", 10**6),
    (" 7000000 ", 7 * 10**6),
])
def test_sizes_read_like_mergekit_and_the_hub(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("text", "message"), [
    ("5", "'5' is 5 bytes, below the smallest allowed, 1MB"),
    ("2K", "'2K' is 2000 bytes, below the smallest allowed, 1MB"),
    ("999KB", "below the smallest allowed, 1MB"),
    ("976KiB", "is 999424 bytes"),
    ("0.9M", "is 900000 bytes"),
    ("lots", "cannot read size 'lots'"),
    ("5GBs", "cannot read size"),
    ("-5GB", "cannot read size"),
    ("", "cannot read size"),
])
def test_unreadable_or_tiny_sizes_are_refused(text: str, message: str) -> None:
    with pytest.raises(OptionError, match=message) as err:
        parse_size(text)
    assert "5B or 5GB (5 billion bytes)" in str(err.value) and "\n" not in str(err.value)


def test_too_small_shard_size_exits_2_with_one_line(tmp_path, trio, capsys: pytest.CaptureFixture[str]) -> None:
    from deltafix.cli import main

    out = tmp_path / "OUT"
    rc = main(["repair", "--base", str(trio["A"]), "--finetuned", str(trio["F"]), "--out", str(out),
               "--method", "resta", "--unaligned", str(trio["P"]), "--out-shard-size", "5KB"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: --out-shard-size '5KB' is 5000 bytes, below the smallest allowed, 1MB;")
    assert not out.exists()
