"""Hostile inputs through the installed console script: each case builds a bad checkpoint, recipe
or option and runs ``deltafix`` in a subprocess, as a release pipeline would.

Every case asserts the contract of DESIGN §3 and §8: the exit code, exactly one non-empty stderr
line without a traceback (naming what is wrong), OUT absent (or unchanged when it existed), no
staging folder left beside OUT or in TMPDIR, and every input byte-identical.

Classes (cases): security: shard paths and duplicate keys (6); header integrity (10); non-finite
values in inputs and outputs (7); method parameters (8); config, recipe and option files (4);
output and staging (1); then the stale-staging and umask runs, and (in process) a publish whose
second rename fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import time
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama
from console import folder_digest, one_line, run_deltafix
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
LINEAR = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """P, A = P + noise, F = A + noise (tiny float32 Llamas); A also as a copy with a word tokenizer."""
    root = tmp_path_factory.mktemp("hostile")
    p = save_tiny_llama(root / "P", seed=0)
    a = save_tiny_llama(root / "A", seed=1, base=p)
    f = save_tiny_llama(root / "F", seed=2, base=a)
    return {"P": p, "A": a, "F": f}


@dataclass
class Case:
    """What one hostile run needs: the arguments after ``deltafix``, the folders it must not
    change, the expected exit code and a phrase the one stderr line must contain."""

    args: list[str]
    inputs: list[Path]
    rc: int
    match: str
    out_exists: bool = False
    limit_file_bytes: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _copy(models: dict[str, Path], role: str, root: Path, name: str | None = None) -> Path:
    dst = root / (name or f"{role}_copy")
    shutil.copytree(models[role], dst)
    return dst


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    return folder


def _poison(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][1, 2] = value
    return edit


def _split_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_raw(path: Path, header_text: bytes, data: bytes, declared: int | None = None) -> None:
    """A safetensors file with exactly this header text and data section (no re-validation)."""
    path.unlink()
    path.write_bytes(struct.pack("<Q", len(header_text) if declared is None else declared) + header_text + data)


def _edit_header(folder: Path, edit: Callable[[dict], None], data_edit: Callable[[bytes], bytes] = lambda d: d) -> Path:
    header, data = _split_header(folder / WEIGHTS)
    edit(header)
    _write_raw(folder / WEIGHTS, json.dumps(header).encode(), data_edit(data))
    return folder


def _by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _sharded(folder: Path, weights: Path, shard: str) -> None:
    """Give ``folder`` an index that names ``shard`` for every tensor of the file ``weights``."""
    names = list(load_file(str(weights)))
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, shard)}))


def _repair(base: Path, finetuned: Path, out: Path, *extra: str, method: str = "resta",
            unaligned: Path | None = None) -> list[str]:
    args = ["repair", "--base", str(base), "--finetuned", str(finetuned), "--out", str(out), "--method", method,
            "--device", "cpu", "--json"]
    if unaligned is not None:
        args += ["--unaligned", str(unaligned)]
    return [*args, *extra]


# --- security: shard paths and duplicate keys -------------------------------------------------


def index_parent_path(m: dict[str, Path], root: Path, out: Path) -> Case:
    f = _copy(m, "F", root)
    shutil.move(str(f / WEIGHTS), root / "outside.safetensors")
    _sharded(f, root / "outside.safetensors", "../outside.safetensors")
    return Case(_repair(m["A"], f, out, unaligned=m["P"]), [f, m["A"], m["P"], root / "outside.safetensors"], 2,
                "'../outside.safetensors', which lies outside")


def index_absolute_path(m: dict[str, Path], root: Path, out: Path) -> Case:
    f = _copy(m, "F", root)
    target = root / "abs.safetensors"
    shutil.move(str(f / WEIGHTS), target)
    _sharded(f, target, str(target))
    return Case(_repair(m["A"], f, out, unaligned=m["P"]), [f, m["A"], m["P"], target], 2, "which lies outside")


def index_symlink_out(m: dict[str, Path], root: Path, out: Path) -> Case:
    f = _copy(m, "F", root)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    shutil.move(str(f / WEIGHTS), elsewhere / "real.safetensors")
    (f / "model-00001-of-00001.safetensors").symlink_to(elsewhere / "real.safetensors")
    _sharded(f, elsewhere / "real.safetensors", "model-00001-of-00001.safetensors")
    return Case(_repair(m["A"], f, out, unaligned=m["P"]), [f, m["A"], m["P"], elsewhere], 2,
                "'model-00001-of-00001.safetensors', which lies outside")


def single_file_symlink_out(m: dict[str, Path], root: Path, out: Path) -> Case:
    a = _copy(m, "A", root)
    shutil.move(str(a / WEIGHTS), root / "a.safetensors")
    (a / WEIGHTS).symlink_to(root / "a.safetensors")
    return Case(_repair(a, m["F"], out, unaligned=m["P"]), [a, m["F"], m["P"]], 2, "links to a file that lies outside")


def index_duplicate_key(m: dict[str, Path], root: Path, out: Path) -> Case:
    f = _copy(m, "F", root)
    names = list(load_file(str(f / WEIGHTS)))
    entries = ", ".join(f'"{n}": "{WEIGHTS}"' for n in names)
    (f / INDEX).write_text(f'{{"weight_map": {{{entries}, "{names[0]}": "{WEIGHTS}"}}}}')
    return Case(_repair(m["A"], f, out, unaligned=m["P"]), [f, m["A"], m["P"]], 2, "twice")


def header_duplicate_key(m: dict[str, Path], root: Path, out: Path) -> Case:
    f = _copy(m, "F", root)
    header, data = _split_header(f / WEIGHTS)
    first = _by_offset(header)[0]
    text = json.dumps(header)
    _write_raw(f / WEIGHTS, (text[:-1] + f', "{first}": ' + json.dumps(header[first]) + "}").encode(), data)
    return Case(_repair(m["A"], f, out, unaligned=m["P"]), [f, m["A"], m["P"]], 2, f"'{first}' twice")


# --- header integrity -------------------------------------------------------------------------


def negative_offset(m: dict[str, Path], root: Path, out: Path) -> Case:
    def edit(h: dict) -> None:
        name = _by_offset(h)[0]
        h[name]["data_offsets"] = [-64, h[name]["data_offsets"][1] - 64]
    f = _edit_header(_copy(m, "F", root), edit)
    return Case(_repair(m["A"], f, out, unaligned=m["P"]), [f, m["A"], m["P"]], 2, "invalid data_offsets")


def overlapping_offsets(m: dict[str, Path], root: Path, out: Path) -> Case:
    def edit(h: dict) -> None:
        first, second = [n for n in _by_offset(h) if h[n]["shape"] == [64, 32]][:2]
        h[second]["data_offsets"] = h[first]["data_offsets"]  # two tensors share one stretch of bytes
    f = _edit_header(_copy(m, "F", root), edit)
    return Case(_repair(m["A"], f, out, unaligned=m["P"]), [f, m["A"], m["P"]], 2, "overlaps the tensor before it")


def trailing_bytes(m: dict[str, Path], root: Path, out: Path) -> Case:
    f = _edit_header(_copy(m, "F", root), lambda h: None, lambda d: d + b"\0" * 64)
    return Case(_repair(m["A"], f, out, unaligned=m["P"]), [f, m["A"], m["P"]], 2, "64 bytes after its last tensor")


def gap_between_tensors(m: dict[str, Path], root: Path, out: Path) -> Case:
    def edit(h: dict) -> None:
        last = _by_offset(h)[-1]
        start, end = h[last]["data_offsets"]
        h[last]["shape"] = [(end - start - 4) // 4]  # one element short: a 4-byte gap
        h[last]["data_offsets"] = [start, end - 4]
    f = _edit_header(_copy(m, "F", root), edit, lambda d: d + b"\0" * 4)
    return Case(_repair(m["A"], f, out, unaligned=m["P"]), [f, m["A"], m["P"]], 2, "bytes after its last tensor")


def wrong_byte_length(m: dict[str, Path], root: Path, out: Path) -> Case:
    def edit(h: dict) -> None:
        h[LINEAR]["shape"] = [64, 16]
    f = _edit_header(_copy(m, "F", root), edit)
    return Case(_repair(m["A"], f, out, unaligned=m["P"]), [f, m["A"], m["P"]], 2, f"tensor '{LINEAR}' spans")


def header_longer_than_file(m: dict[str, Path], root: Path, out: Path) -> Case:
    f = _copy(m, "F", root)
    header, data = _split_header(f / WEIGHTS)
    text = json.dumps(header).encode()
    _write_raw(f / WEIGHTS, text, data, declared=len(text) + len(data) + 1)
    return Case(_repair(m["A"], f, out, unaligned=m["P"]), [f, m["A"], m["P"]], 2, "length does not fit the file")


def header_deeply_nested(m: dict[str, Path], root: Path, out: Path) -> Case:
    f = _copy(m, "F", root)
    _, data = _split_header(f / WEIGHTS)
    _write_raw(f / WEIGHTS, b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", data)
    return Case(_repair(m["A"], f, out, unaligned=m["P"]), [f, m["A"], m["P"]], 2, "nested too deeply")


def metadata_as_list(m: dict[str, Path], root: Path, out: Path) -> Case:
    f = _edit_header(_copy(m, "F", root), lambda h: h.update({"__metadata__": ["format", "pt"]}))
    return Case(_repair(m["A"], f, out, unaligned=m["P"]), [f, m["A"], m["P"]], 2, "__metadata__")


def metadata_not_strings(m: dict[str, Path], root: Path, out: Path) -> Case:
    a = _edit_header(_copy(m, "A", root), lambda h: h.update({"__metadata__": {"format": {"nested": 1}}}))
    return Case(_repair(a, m["F"], out, unaligned=m["P"]), [a, m["F"], m["P"]], 2, "map of strings to strings")


def unknown_dtype(m: dict[str, Path], root: Path, out: Path) -> Case:
    p = _edit_header(_copy(m, "P", root), lambda h: h[LINEAR].update({"dtype": "F31"}))
    return Case(_repair(m["A"], m["F"], out, unaligned=p), [p, m["A"], m["F"]], 2, "unsupported dtype 'F31'")


# --- non-finite values --------------------------------------------------------------------------


def nan_in_aligned_streamed(m: dict[str, Path], root: Path, out: Path) -> Case:
    a = _edit_tensors(_copy(m, "A", root), _poison(LINEAR, float("nan")))
    return Case(_repair(a, m["F"], out, unaligned=m["P"]), [a, m["F"], m["P"]], 2,
                f"aligned model's tensor '{LINEAR}' contains NaN or Inf")


def inf_in_unaligned_streamed(m: dict[str, Path], root: Path, out: Path) -> Case:
    p = _edit_tensors(_copy(m, "P", root), _poison(LINEAR, float("-inf")))
    return Case(_repair(m["A"], m["F"], out, unaligned=p), [p, m["A"], m["F"]], 2,
                f"unaligned model's tensor '{LINEAR}' contains NaN or Inf")


def nan_in_finetuned_norm(m: dict[str, Path], root: Path, out: Path) -> Case:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.norm.weight"][5] = float("nan")  # not a Linear: no delta norm rides along
    f = _edit_tensors(_copy(m, "F", root), edit)
    return Case(_repair(m["A"], f, out, unaligned=m["P"]), [f, m["A"], m["P"]], 2,
                "fine-tune's tensor 'model.norm.weight' contains NaN or Inf; fix it or pass --allow-nonfinite")


def nan_in_aligned_whole_tensor(m: dict[str, Path], root: Path, out: Path) -> Case:
    a = _edit_tensors(_copy(m, "A", root), _poison(LINEAR, float("nan")))
    return Case(_repair(a, m["F"], out, "--set", "projector=exact", method="asft", unaligned=m["P"]),
                [a, m["F"], m["P"]], 2, f"aligned model's tensor '{LINEAR}' contains NaN or Inf")


def nan_in_aligned_safedelta(m: dict[str, Path], root: Path, out: Path) -> Case:
    """Safe Delta calibrates on A first: the NaN must be named there, not blamed on damping."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    a = _edit_tensors(_copy(m, "A", root), _poison(LINEAR, float("nan")))
    backend = Tokenizer(tok_models.WordLevel({"<unk>": 0, "<pad>": 1, "</s>": 2, "I": 3, "no": 4}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(a)
    return Case(_repair(a, m["F"], out, "--no-cache", method="safedelta"), [a, m["F"]], 2,
                f"tensor '{LINEAR}' contains NaN or Inf")


def nan_in_adapter(m: dict[str, Path], root: Path, out: Path) -> Case:
    from peft import LoraConfig
    from peft_models import save_adapter

    adapter = save_adapter(m["A"], root / "adapter", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = next(n for n in tensors if "lora_B" in n)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return Case(_repair(m["A"], adapter, out, method="asft", unaligned=m["P"]), [adapter, m["A"], m["P"]], 2,
                "contains NaN or Inf; fix it or pass --allow-nonfinite")


def nonfinite_output(m: dict[str, Path], root: Path, out: Path) -> Case:
    """A finite scale past float32's range makes every repaired weight infinite: an internal error,
    and nothing reaches OUT."""
    return Case(_repair(m["A"], m["F"], out, "--set", "scale=1e300", unaligned=m["P"]), [m["A"], m["F"], m["P"]], 3,
                "came out with NaN or Inf from finite inputs; nothing was published")


# --- method parameters --------------------------------------------------------------------------


def _param_case(method: str, setting: str, match: str) -> Callable[[dict[str, Path], Path, Path], Case]:
    def build(m: dict[str, Path], root: Path, out: Path) -> Case:
        return Case(_repair(m["A"], m["F"], out, "--set", setting, method=method, unaligned=m["P"]),
                    [m["A"], m["F"], m["P"]], 2, match)
    return build


# --- config, recipe and option files --------------------------------------------------------------


def config_not_json(m: dict[str, Path], root: Path, out: Path) -> Case:
    f = _copy(m, "F", root)
    (f / "config.json").write_text("{'model_type': 'llama',}")
    return Case(_repair(m["A"], f, out, unaligned=m["P"]), [f, m["A"], m["P"]], 2, "config.json is not valid JSON")


def config_not_object(m: dict[str, Path], root: Path, out: Path) -> Case:
    f = _copy(m, "F", root)
    (f / "config.json").write_text('["llama"]')
    return Case(_repair(m["A"], f, out, unaligned=m["P"]), [f, m["A"], m["P"]], 2, "holds a JSON array, not an object")


def recipe_deeply_nested(m: dict[str, Path], root: Path, out: Path) -> Case:
    recipe = root / "recipe.yaml"
    recipe.write_text("method: resta\nparameters:\n  scale: " + "[" * 5_000 + "]" * 5_000 + "\n")
    return Case(_repair(m["A"], m["F"], out, "--recipe", str(recipe), unaligned=m["P"]),
                [m["A"], m["F"], m["P"], recipe], 2, "nested too deeply")


def set_value_deeply_nested(m: dict[str, Path], root: Path, out: Path) -> Case:
    return Case(_repair(m["A"], m["F"], out, "--set", "scale=" + "[" * 5_000, unaligned=m["P"]),
                [m["A"], m["F"], m["P"]], 2, "--set scale")


# --- output and staging ---------------------------------------------------------------------------


def disk_fills_while_replacing(m: dict[str, Path], root: Path, out: Path) -> Case:
    """--overwrite of an existing OUT on a disk that takes 40 kB per file (RLIMIT_FSIZE): the old OUT
    stays exactly as it was."""
    out.mkdir()
    (out / "keep.txt").write_text("the previous release")
    return Case(_repair(m["A"], m["F"], out, "--overwrite", unaligned=m["P"]), [m["A"], m["F"], m["P"]], 2,
                "File too large", out_exists=True, limit_file_bytes=40_000)


CASES: dict[str, Callable[[dict[str, Path], Path, Path], Case]] = {
    "security/index-parent-path": index_parent_path,
    "security/index-absolute-path": index_absolute_path,
    "security/index-symlink-out": index_symlink_out,
    "security/single-file-symlink-out": single_file_symlink_out,
    "security/index-duplicate-key": index_duplicate_key,
    "security/header-duplicate-key": header_duplicate_key,
    "header/negative-offset": negative_offset,
    "header/overlapping-offsets": overlapping_offsets,
    "header/trailing-bytes": trailing_bytes,
    "header/gap-between-tensors": gap_between_tensors,
    "header/wrong-byte-length": wrong_byte_length,
    "header/length-past-file": header_longer_than_file,
    "header/deeply-nested": header_deeply_nested,
    "header/metadata-list": metadata_as_list,
    "header/metadata-not-strings": metadata_not_strings,
    "header/unknown-dtype": unknown_dtype,
    "nonfinite/nan-in-A-streamed": nan_in_aligned_streamed,
    "nonfinite/inf-in-P-streamed": inf_in_unaligned_streamed,
    "nonfinite/nan-in-F-norm": nan_in_finetuned_norm,
    "nonfinite/nan-in-A-whole-tensor": nan_in_aligned_whole_tensor,
    "nonfinite/nan-in-A-safedelta": nan_in_aligned_safedelta,
    "nonfinite/nan-in-adapter": nan_in_adapter,
    "nonfinite/output": nonfinite_output,
    "params/scale-nan": _param_case("resta", "scale=nan", "scale takes a finite number >= 0.0 or 'auto', not 'nan'"),
    "params/scale-inf": _param_case("resta", "scale=.inf", "scale takes a finite number"),
    "params/scale-1e400": _param_case("resta", "scale=1e400", "not '1e400'"),
    "params/scale-negative": _param_case("resta", "scale=-0.5", "scale takes a finite number >= 0.0"),
    "params/dare-one": _param_case("resta", "dare=1", "dare takes a finite number >= 0.0 and < 1.0, not 1"),
    "params/asft-lam-nan": _param_case("asft", "lam=.nan", "lam takes a number >= 0.0 (inf allowed)"),
    "params/regmean-mu-zero": _param_case("regmean", "mu=0", "mu takes a finite number > 0.0"),
    "params/safedelta-damp-inf": _param_case("safedelta", "damp=inf", "damp takes a finite number >= 0.0, not 'inf'"),
    "files/config-not-json": config_not_json,
    "files/config-not-object": config_not_object,
    "files/recipe-deeply-nested": recipe_deeply_nested,
    "files/set-deeply-nested": set_value_deeply_nested,
    "output/disk-fills-while-replacing": disk_fills_while_replacing,
}


def _limits(file_bytes: int | None) -> Callable[[], None] | None:
    """A child-side file size limit; SIGXFSZ ignored so a write past it fails with EFBIG."""
    if file_bytes is None:
        return None

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    return apply


def _env(tmp_path: Path) -> dict[str, str]:
    """A private TMPDIR (to see staging left there) and deltafix cache; no network."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp), "DELTAFIX_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
            "TQDM_DISABLE": "1"}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(name: str, models: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "inputs"
    root.mkdir()
    out = tmp_path / "outs" / "OUT"
    out.parent.mkdir()
    case = CASES[name](models, root, out)
    before = {path: folder_digest(path) if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
              for path in case.inputs}
    out_before = folder_digest(out) if case.out_exists else None

    run = run_deltafix(*case.args, env=_env(tmp_path), preexec_fn=_limits(case.limit_file_bytes))

    assert run.returncode == case.rc, run.stderr
    line = one_line(run.stderr)
    assert case.match in line, line
    if case.out_exists:
        assert folder_digest(out) == out_before
        assert (out / "keep.txt").read_text() == "the previous release"
    else:
        assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name != "OUT"] == []
    assert not list((tmp_path / "tmpdir").glob("deltafix-*"))
    after = {path: folder_digest(path) if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
             for path in case.inputs}
    assert after == before


def test_stale_staging_is_removed_and_said_once(models: dict[str, Path], tmp_path: Path) -> None:
    """Folders a killed run left (its pid gone) are removed by the next run, with one stderr line;
    an old OUT it had moved aside comes back; a live process's folder stays."""
    from deltafix.io.staging import OLD_PREFIX, STAGE_PREFIX, TMP_PREFIX, _host_tag

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    dead, tag = done.pid, _host_tag()
    outs = tmp_path / "outs"
    (outs / f"{TMP_PREFIX}{dead}-{tag}-0001" / "model.safetensors").parent.mkdir(parents=True)
    holder = outs / f"{OLD_PREFIX}{dead}-{tag}-0002" / "RELEASE"
    holder.mkdir(parents=True)
    (holder / "weights.txt").write_text("the release being replaced")
    live = outs / f"{TMP_PREFIX}{os.getppid()}-{tag}-0003"
    live.mkdir()
    env = _env(tmp_path)
    (Path(env["TMPDIR"]) / f"{STAGE_PREFIX}{dead}-{tag}-0004").mkdir()

    run = run_deltafix(*_repair(models["A"], models["F"], outs / "OUT", unaligned=models["P"]), env=env)

    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "removed 3 staging folder(s) left by killed runs" in lines[0], run.stderr
    assert sorted(p.name for p in outs.iterdir()) == sorted(["OUT", "RELEASE", live.name])
    assert (outs / "RELEASE" / "weights.txt").read_text() == "the release being replaced"
    assert not list(Path(env["TMPDIR"]).iterdir())


def test_out_has_the_umask_mode(models: dict[str, Path], tmp_path: Path) -> None:
    """OUT is renamed from a staging folder; it must read like any folder the user makes (0755 under
    umask 022), not 0700 as ``mkdtemp`` would make it."""
    out = tmp_path / "OUT"
    run = run_deltafix(*_repair(models["A"], models["F"], out, unaligned=models["P"]), env=_env(tmp_path),
                       preexec_fn=lambda: os.umask(0o022))
    assert run.returncode == 0, run.stderr
    assert out.stat().st_mode & 0o777 == 0o755


def test_a_failed_swap_puts_the_old_out_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills (or a signal lands) between moving the old OUT aside and renaming the new one
    in: the old OUT is moved back, the error is an OutputError, and nothing is left beside it."""
    import errno

    from deltafix.errors import OutputError
    from deltafix.io import writer

    out = tmp_path / "OUT"
    out.mkdir()
    (out / "keep.txt").write_text("the previous release")
    real_replace = os.replace

    def full_on_publish(src: Path, dst: Path) -> None:
        if Path(src).name.startswith(".deltafix-tmp-") and Path(dst) == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(writer.os, "replace", full_on_publish)
    with pytest.raises(OutputError, match="no space left"):
        with writer.atomic_output(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "the previous release"


def test_a_signal_as_the_staging_folder_is_made_leaves_nothing(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM landing right after the staging folder exists, before its cleanup is armed (the race
    that once left a ``.deltafix-tmp-*`` folder in CI), with another thread running as the hashing
    threads do: the signal's effect waits until the cleanup covers the folder, so the run stops
    and nothing is left beside OUT."""
    import threading

    from deltafix.cli import Signalled, signals_as_exceptions
    from deltafix.io import writer

    made = writer.make_staging

    def made_then_signalled(parent: Path, prefix: str) -> Path:
        path = made(parent, prefix)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs here, inside the window
        return path

    monkeypatch.setattr(writer, "make_staging", made_then_signalled)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with pytest.raises(Signalled):
            with signals_as_exceptions():
                with writer.atomic_output(tmp_path / "OUT") as tmp:
                    (tmp / "model.safetensors").write_bytes(b"new")
    finally:
        stop.set()
        other.join()
    assert list(tmp_path.iterdir()) == []
