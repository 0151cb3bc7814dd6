"""The one JSONL reader (deltafix.io.jsonl): every data file fails the same way, naming file:line."""

from pathlib import Path

import pytest

from deltafix.engine.autotune import TuneSet, tune_prompts
from deltafix.errors import InputError
from deltafix.evaluation.data import load_prompts
from deltafix.io.jsonl import read_jsonl, read_prompt_records


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_lines_end_at_newline_only_and_a_bom_is_dropped(tmp_path: Path) -> None:
    """U+2028 and U+0085 are legal inside JSON strings; str.splitlines would cut the record there."""
    path = _write(tmp_path, "d.jsonl", '\ufeff{"prompt": "a\u2028b\x85c"}\r\n\r\n'.encode())
    assert read_jsonl(path) == [(f"{path}:1", {"prompt": "a\u2028b\x85c"})]


@pytest.mark.parametrize("data, line, words", [
    (b'{"prompt": "ok"}\n\xff\n', 2, "not UTF-8 text"),
    (b'{"prompt": "ok"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n", 2, "nested too deeply"),
    (b'{"prompt": "ok"}\n"just a string"\n', 2, "JSON object per line, got a string"),
    (b'{"prompt": "ok"}\n\n{"prompt": "ok"}\n', 2, "empty line"),
])
def test_bad_line_is_one_input_error_at_file_and_line(tmp_path: Path, data: bytes, line: int, words: str) -> None:
    path = _write(tmp_path, "bad.jsonl", data)
    with pytest.raises(InputError, match=rf"bad\.jsonl:{line}: .*{words}") as caught:
        read_jsonl(path)
    assert "\n" not in str(caught.value)


def test_prompt_lists_skip_blank_lines_and_fall_back_to_plain_text(tmp_path: Path) -> None:
    jsonl = _write(tmp_path, "p.json", b'{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert [r["prompt"] for _, r in read_prompt_records(jsonl)] == ["a", "b"]
    text = _write(tmp_path, "p.txt", b"  a  \r\n\r\nb\n")
    assert read_prompt_records(text) == [(f"{text}:1", {"prompt": "a"}), (f"{text}:3", {"prompt": "b"})]


def test_tune_prompts_read_categories_messages_and_plain_lines(tmp_path: Path) -> None:
    jsonl = _write(tmp_path, "t.jsonl", b'{"prompt": "a", "category": "c"}\n\n'
                                        b'{"messages": [{"role": "user", "content": "b"}]}\n')
    assert tune_prompts(jsonl) == TuneSet(["a", "b"], ["c", None], [None, None])
    assert tune_prompts(_write(tmp_path, "t.txt", b"x\ny\n")) == TuneSet(["x", "y"], [None, None], [None, None])
    assert len(tune_prompts(None).prompts) == 120


@pytest.mark.parametrize("data, line, words", [
    (b'{"prompt": "a"}\n{"prompt": "b"\n', 2, "not valid JSON"),
    (b'{"prompt": "a"}\n{"category": "c"}\n', 2, '"prompt"'),
    (b'{"prompt": "a"}\n{"prompt": 5}\n', 2, '"prompt"'),
    (b'{"messages": []}\n', 1, "'messages'"),
])
def test_bad_tune_prompt_names_file_and_line(tmp_path: Path, data: bytes, line: int, words: str) -> None:
    with pytest.raises(InputError, match=rf"t\.jsonl:{line}: .*{words}"):
        tune_prompts(_write(tmp_path, "t.jsonl", data))


@pytest.mark.parametrize("reader", [read_jsonl, load_prompts, tune_prompts])
def test_missing_unreadable_and_empty_files(tmp_path: Path, reader) -> None:
    with pytest.raises(InputError, match="does not exist"):
        reader(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="cannot read"):
        reader(tmp_path)
    with pytest.raises(InputError, match="holds no"):
        reader(_write(tmp_path, "empty.jsonl", b"\n\n"))
