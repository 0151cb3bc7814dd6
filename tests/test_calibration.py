"""Calibration: safety data loading, layer-sequential Hessian capture, and the Hessian cache.

Models are tiny random Llama / Qwen2 checkpoints saved with ``save_pretrained``; the reference
Hessians come from hooks on the fully loaded model, written here independently of the code
under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

import deltafix.calibration.cache as hcache
import deltafix.io.hashing as hashing
from deltafix.calibration.render import CalibrationSet, load_calibration, read_conversations
from deltafix.errors import InputError
from deltafix.calibration.cache import MANIFEST, cache_key, hessians_for
from deltafix.calibration.capture import capture_hessians

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 100


def tiny_config(family: str, *, layers: int = 3, hidden: int = 32, intermediate: int = 64):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if family == "llama":
        return LlamaConfig(**common)
    # Sliding-window layers after the first: each layer gets its own attention mask.
    return Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=1)


def save_model(config, folder: Path, dtype: torch.dtype = torch.float32, shard: str | None = None) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request, tmp_path_factory) -> Path:
    """Llama in one file; Qwen2 in several shards with an index."""
    shard = "40KB" if request.param == "qwen2" else None
    return save_model(tiny_config(request.param), tmp_path_factory.mktemp(request.param), shard=shard)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_model(tiny_config("llama"), tmp_path_factory.mktemp("llama_cache"))


def token_samples(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]


def collect(folder: Path, samples: list[torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for layer in capture_hessians(folder, samples, **kwargs):
        out.update(layer.hessians)
    return out


def whole_model_hessians(folder: Path, samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference: the whole model in memory, one right-padded batch, hooks on every layer Linear."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    width = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for row, s in enumerate(samples):
        ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def pre(_module, args):
            x = args[0][mask.bool()].double()
            sums[name] = sums.get(name, 0) + x.T @ x

        return pre

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.register_forward_pre_hook(hook(f"{name}.weight"))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    return {name: (2.0 / len(samples) * s).float() for name, s in sums.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- Hessian capture


def test_sequential_capture_equals_whole_model(model_dir):
    samples = token_samples([7, 12, 3, 9, 12, 5])
    got = collect(model_dir, samples, batch_size=4)
    want = whole_model_hessians(model_dir, samples)
    assert set(got) == set(want)
    assert len(want) == 3 * 7
    for name, h in want.items():
        assert got[name].dtype == torch.float32 and got[name].device.type == "cpu"
        assert got[name].shape == h.shape
        assert rel_err(got[name], h) < 1e-4, name


def test_padding_adds_nothing(model_dir):
    samples = token_samples([2, 11, 6, 4], seed=3)
    padded = collect(model_dir, samples, batch_size=4)
    alone = collect(model_dir, samples, batch_size=1)
    for name, h in alone.items():
        assert rel_err(padded[name], h) < 1e-5, name


def test_hessian_scales_with_number_of_samples(llama_dir):
    """N counts samples: the same sample twice gives the same H as once (running mean)."""
    one = token_samples([8], seed=5)
    once = collect(llama_dir, one)
    twice = collect(llama_dir, one + one)
    for name, h in once.items():
        assert rel_err(twice[name], h) < 1e-5
        assert torch.allclose(h, h.T, atol=1e-5 * h.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_capture_on_cuda_matches_cpu(model_dir):
    samples = token_samples([7, 12, 3, 9])
    on_cpu = collect(model_dir, samples, batch_size=2)
    on_gpu = collect(model_dir, samples, batch_size=2, device="cuda")
    for name, h in on_cpu.items():
        assert on_gpu[name].device.type == "cpu"
        assert rel_err(on_gpu[name], h) < 1e-3, name


# ---------------------------------------------------------------- Hessian cache


@pytest.fixture
def counted_capture(monkeypatch):
    """Count the real capture_hessians calls made by the cache."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0])
        return capture_hessians(*args, **kwargs)

    monkeypatch.setattr(hcache, "capture_hessians", counting)
    return calls


def calib(lengths: list[int], seed: int = 1) -> CalibrationSet:
    return CalibrationSet(samples=token_samples(lengths, seed), source="test", max_length=64)


def assert_store_matches(store, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(store.names) == sorted(expected)
    for name, h in expected.items():
        assert torch.equal(store.get(name), h), name


def test_cache_reuse_corruption_and_key(llama_dir, tmp_path, counted_capture):
    data = calib([5, 9, 4])
    expected = collect(llama_dir, data.samples)
    cache = tmp_path / "cache"

    first = hessians_for(llama_dir, data, cache_dir=cache)
    assert not first.from_cache and len(counted_capture) == 1
    assert_store_matches(first, expected)

    second = hessians_for(llama_dir, data, cache_dir=cache)
    assert second.from_cache and len(counted_capture) == 1
    assert second.key == first.key
    assert_store_matches(second, expected)

    # Shared inputs are stored once: q/k/v and gate/up read the same tensor in Llama.
    manifest = json.loads((cache / first.key / MANIFEST).read_text())
    stored = {(w["file"], w["tensor"]) for w in manifest["weights"].values()}
    assert len(stored) == 3 * 4

    # Flip bytes inside a layer file (same size): the checksum catches it and the entry is rebuilt.
    layer_file = cache / first.key / "layer_00001.safetensors"
    raw = bytearray(layer_file.read_bytes())
    raw[-64:] = bytes(64)
    layer_file.write_bytes(bytes(raw))
    third = hessians_for(llama_dir, data, cache_dir=cache)
    assert not third.from_cache and third.rebuilt_reason and len(counted_capture) == 2
    assert_store_matches(third, expected)

    # A truncated file, a missing layer file and a foreign manifest are rebuilt too.
    layer_file.write_bytes(layer_file.read_bytes()[:-100])
    assert hessians_for(llama_dir, data, cache_dir=cache).rebuilt_reason
    (cache / first.key / "layer_00002.safetensors").unlink()
    assert hessians_for(llama_dir, data, cache_dir=cache).rebuilt_reason
    manifest = json.loads((cache / first.key / MANIFEST).read_text())
    manifest["key"] = "0" * 64
    (cache / first.key / MANIFEST).write_text(json.dumps(manifest))
    fourth = hessians_for(llama_dir, data, cache_dir=cache)
    assert not fourth.from_cache and len(counted_capture) == 5
    assert_store_matches(fourth, expected)
    assert hessians_for(llama_dir, data, cache_dir=cache).from_cache

    # Other data (or another compute dtype) is another key; nothing else is left in the cache.
    other = hessians_for(llama_dir, calib([5, 9, 4], seed=2), cache_dir=cache)
    assert other.key != first.key and not other.from_cache
    entries = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert entries == sorted([first.key, other.key])


def test_cache_key_follows_weights_and_dtype(tmp_path, monkeypatch):
    """Rewriting the weights in place changes the key even though the file hash is memoised."""
    monkeypatch.setenv("DELTAFIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hashing, "RACY_NS", 0)  # the model was written just now: memoise it anyway
    folder = save_model(tiny_config("llama", layers=2), tmp_path / "model")
    data = calib([6, 6])
    memo = tmp_path / "cache" / "file-sha256.json"
    before = cache_key(folder, data, torch.float32)
    assert cache_key(folder, data, torch.float32) == before
    assert any(k.startswith(str((folder / "model.safetensors").resolve())) for k in json.loads(memo.read_text()))
    assert cache_key(folder, data, torch.bfloat16) != before
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(1.0)
    model.save_pretrained(folder)
    assert cache_key(folder, data, torch.float32) != before


def test_no_cache_reads_and_writes_nothing(llama_dir, tmp_path, monkeypatch, counted_capture):
    monkeypatch.setenv("DELTAFIX_CACHE", str(tmp_path / "env_cache"))
    data = calib([5, 7])
    progress: list[tuple[int, int]] = []
    store = hessians_for(llama_dir, data, no_cache=True, progress=lambda *done: progress.append(done))
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert_store_matches(store, collect(llama_dir, data.samples))
    assert not (tmp_path / "env_cache").exists()
    entry = store.entry
    store.close()
    assert not entry.exists()
    cached = hessians_for(llama_dir, data)
    assert (tmp_path / "env_cache" / "hessians" / cached.key / MANIFEST).is_file()
    assert len(counted_capture) == 2


# ---------------------------------------------------------------- peak memory


# VmHWM, not getrusage's ru_maxrss: ru_maxrss survives exec, so a child would report the
# parent's (pytest's) peak; VmHWM belongs to the new process image.
MEMORY_CHILD = textwrap.dedent(
    """
    import re, sys, torch
    from deltafix.calibration.capture import capture_hessians
    torch.set_num_threads(1)
    samples = [torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for layer in capture_hessians(sys.argv[1], samples, batch_size=4):
        del layer
    print(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
    """
)


def start_peak_rss(folder: Path) -> subprocess.Popen:
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(
        [sys.executable, "-c", MEMORY_CHILD, str(folder)], env=env, stdout=subprocess.PIPE, text=True
    )


def peak_rss_kib(child: subprocess.Popen) -> int:
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    return int(out.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_does_not_grow_with_depth(tmp_path):
    """Each layer is 54 MB in fp32: all 8 loaded would add ~320 MB to a ~450 MB process.

    Measured when whole models are loaded instead (transformers from_pretrained + forward):
    about 500 MB for 2 layers and 940 MB for 8, so this test fails for any scheme that keeps
    the layers.
    """
    wide = dict(hidden=1024, intermediate=3072)
    shallow = save_model(tiny_config("llama", layers=2, **wide), tmp_path / "l2", torch.bfloat16)
    deep = save_model(tiny_config("llama", layers=8, **wide), tmp_path / "l8", torch.bfloat16)
    children = [start_peak_rss(shallow), start_peak_rss(deep)]
    small, large = (peak_rss_kib(child) for child in children)
    assert large < 1.2 * small, (small, large)


# ---------------------------------------------------------------- safety data


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<unk>", "<s>", "</s>", "user", "assistant", ":", "how", "do", "i", "make", "a", "bomb"]
    words += ["sorry", "cannot", "help", "with", "that", "pick", "lock", "no"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_both_formats_render_the_same_conversation(tmp_path, word_tokenizer):
    path = write_jsonl(
        tmp_path / "s.jsonl",
        [
            json.dumps({"prompt": "how do i make a bomb", "response": "sorry i cannot help", "category": "weapons"}),
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "how do i make a bomb"},
                        {"role": "assistant", "content": "sorry i cannot help"},
                    ]
                }
            ),
        ],
    )
    word_tokenizer.chat_template = TEMPLATE
    try:
        templated = load_calibration(path, word_tokenizer)
    finally:
        word_tokenizer.chat_template = None
    plain = load_calibration(path, word_tokenizer)
    vocab = word_tokenizer.get_vocab()
    ids = lambda text: [vocab[w] for w in text.split()]  # noqa: E731
    assert templated.templated and not plain.templated
    want = ids("<s> user : how do i make a bomb </s> assistant : sorry i cannot help </s>")
    assert [s.tolist() for s in templated.samples] == [want, want]
    want_plain = ids("how do i make a bomb sorry i cannot help </s>")
    assert [s.tolist() for s in plain.samples] == [want_plain, want_plain]
    assert templated.truncated == 0 and templated.digest != plain.digest
    assert load_calibration(path, word_tokenizer).digest == plain.digest


def test_truncation_is_counted(tmp_path, word_tokenizer):
    path = write_jsonl(
        tmp_path / "s.jsonl",
        [
            json.dumps({"prompt": "how do i pick a lock", "response": "no"}),
            json.dumps({"prompt": "how", "response": "no"}),
        ],
    )
    data = load_calibration(path, word_tokenizer, max_length=4)
    assert data.truncated == 1
    assert [len(s) for s in data.samples] == [4, 3]
    assert data.digest != load_calibration(path, word_tokenizer, max_length=5).digest


def test_max_samples_picks_evenly_through_the_file(tmp_path, word_tokenizer):
    """10 conversations, 4 wanted: the 1st, 4th, 7th and 10th, so a file sorted by topic still gives
    every part of it; a file with fewer conversations than wanted gives them all."""
    words = ["how", "do", "i", "pick", "a", "lock"]
    path = write_jsonl(tmp_path / "u.jsonl", [json.dumps({"prompt": " ".join(words[: 1 + i % 6]), "response": "no"})
                                               for i in range(10)])
    whole = load_calibration(path, word_tokenizer)
    some = load_calibration(path, word_tokenizer, max_samples=4)
    assert (whole.available, len(whole.samples), some.available, len(some.samples)) == (10, 10, 10, 4)
    assert [s.tolist() for s in some.samples] == [whole.samples[i].tolist() for i in (0, 3, 6, 9)]
    assert len(load_calibration(path, word_tokenizer, max_samples=50).samples) == 10
    with pytest.raises(InputError, match="max_samples"):
        load_calibration(path, word_tokenizer, max_samples=0)


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("{not json", "not valid JSON"),
        ("", "empty line"),
        ('{"prompt": "how"}', "'prompt' and 'response'"),
        ('{"prompt": "", "response": "no"}', "must not be empty"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "user"}]}', "'content'"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, says):
    good = json.dumps({"prompt": "how", "response": "no"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad, good])
    with pytest.raises(InputError, match=rf"bad\.jsonl:2: .*{says}"):
        read_conversations(path)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_conversations(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="no records"):
        read_conversations(tmp_path / "empty.jsonl")
