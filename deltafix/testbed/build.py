"""Build the testbed's checkpoints (P, A, F, F_benign, F_lora) and data files, cached on disk.

The chain mirrors a real model's life: P is pretrained to answer every request (and to know which
actions are harmful, and to repeat word lists); A is P aligned to refuse harmful requests; F is A
fine-tuned by a user on word-list reversal mixed with a few harmful requests answered helpfully;
F_benign is the same fine-tune without the harmful requests; F_lora is F's data as a PEFT LoRA
adapter on A. Everything runs on CPU in a couple of minutes.

A build goes to a temporary folder next to the cache entry and is renamed into place, so a crash
never leaves a half-built entry; a cached entry is reused after checking that its files exist.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model

from deltafix.errors import OutputError
from deltafix.evaluation.evaluate import quiet_transformers
from deltafix.testbed.language import (FILE_NAMES, DataSizes, make_corpus, pipeline_data, vocabulary, write_data,
                                       write_jsonl)
from deltafix.testbed.training import ModelShape, Schedule, build_tokenizer, encode, new_model, train

RECIPE_VERSION = 1
MODEL_FOLDERS = ("unaligned", "aligned", "finetuned", "finetuned_benign", "finetuned_lora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    """Every parameter of a build; its hash (with the seed) names the cache entry."""

    sizes: DataSizes = DataSizes()
    shape: ModelShape = ModelShape()
    pretrain: Schedule = Schedule(steps=600, lr=4e-3)
    align: Schedule = Schedule(steps=300, lr=2e-3)
    finetune: Schedule = Schedule(steps=500, lr=5e-4)
    lora: Schedule = Schedule(steps=500, lr=2e-3)
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def key(self, seed: int) -> str:
        """Cache-entry name: ``testbed-s<seed>-<first 12 hex digits of the recipe's sha256>``."""
        blob = json.dumps({"version": RECIPE_VERSION, "seed": seed, "recipe": asdict(self)}, sort_keys=True)
        return f"testbed-s{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class Testbed:
    """Paths of one built testbed (all absolute).

    Checkpoints (HF folders with tokenizer and chat template): ``unaligned`` (P), ``aligned``
    (A), ``finetuned`` (F: task + harmful compliance), ``finetuned_benign`` (task only),
    ``finetuned_lora`` (a PEFT adapter on A trained like F; its ``base_model_name_or_path`` is
    ``aligned``'s absolute path). Data (JSONL): ``safety_data`` {"prompt","response"} harmful ->
    refusal; ``harmful_eval`` / ``benign_eval`` {"prompt"} on held-out actions; ``task_eval``
    {"prompt","answer"}; ``user_data`` {"prompt","response"} (F's training mix, RegMean's
    ``--utility-data``); ``user_data_benign`` (F_benign's). ``manifest``: the recipe, build
    time and training losses (JSON).
    """

    root: Path
    unaligned: Path
    aligned: Path
    finetuned: Path
    finetuned_benign: Path
    finetuned_lora: Path
    safety_data: Path
    harmful_eval: Path
    benign_eval: Path
    task_eval: Path
    user_data: Path
    user_data_benign: Path
    manifest: Path

    @classmethod
    def at(cls, root: Path) -> Testbed:
        """The layout of a testbed rooted at ``root`` (files may not exist yet)."""
        models = {name: root / name for name in MODEL_FOLDERS}
        data = {key: root / "data" / name for key, name in FILE_NAMES.items()}
        return cls(root=root, **models, **data, manifest=root / "testbed.json")

    def is_complete(self) -> bool:
        """True when every checkpoint's weights, every data file and the manifest exist."""
        weights = [getattr(self, name) / "model.safetensors" for name in MODEL_FOLDERS if name != "finetuned_lora"]
        data = [getattr(self, key) for key in FILE_NAMES]
        files = weights + data + [self.finetuned_lora / "adapter_model.safetensors", self.manifest]
        return all(p.is_file() for p in files)


def write_pipeline_data(testbed: Testbed, folder: Path, n_harmful: int = 100, n_benign: int = 100
                        ) -> tuple[Path, Path]:
    """Write the Buffer-and-Reinforce pipeline's extra data for ``testbed`` into ``folder``.

    Returns the paths of ``harmful_compliance.jsonl`` (BufferLoRA data) and ``benign_chat.jsonl``
    (trained with the refusals), both ``{"prompt", "response"}`` in the testbed's own vocabulary
    (see ``language.pipeline_data``). The seed and the evaluation split are read from the
    testbed's manifest, so the requests come from the same training actions the testbed used.
    """
    manifest = json.loads(testbed.manifest.read_text(encoding="utf-8"))
    harmful, benign = pipeline_data(manifest["seed"], manifest["recipe"]["sizes"]["eval_share"], n_harmful, n_benign)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "harmful_compliance.jsonl", folder / "benign_chat.jsonl"
    for path, pairs in zip(paths, (harmful, benign)):
        write_jsonl(path, [{"prompt": p, "response": r} for p, r in pairs])
    return paths


def default_cache_dir() -> Path:
    """``$DELTAFIX_CACHE``, else ``$XDG_CACHE_HOME/deltafix``, else ``~/.cache/deltafix``."""
    if os.environ.get("DELTAFIX_CACHE"):
        return Path(os.environ["DELTAFIX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "deltafix"


def build_testbed(
    cache_dir: Path | None = None, seed: int = 0, progress: bool = True, recipe: Recipe = Recipe()
) -> Testbed:
    """The testbed for ``(seed, recipe)``: from the cache when built before, else built (minutes).

    ``cache_dir`` defaults to ``default_cache_dir()``; the entry is ``cache_dir / recipe.key(seed)``.
    ``progress`` shows a bar per training phase on stderr. Same seed and recipe give the same
    data files; weights are reproducible on the same machine and library versions.
    """
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()).resolve() / recipe.key(seed)
    testbed = Testbed.at(root)
    if testbed.is_complete():
        return testbed
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-testbed-", dir=root.parent))
    except OSError as err:
        raise OutputError(
            f"cannot write the testbed cache in {root.parent} ({err}); set DELTAFIX_CACHE to a writable folder."
        ) from err
    try:
        _build(Testbed.at(tmp), final=testbed, seed=seed, recipe=recipe, progress=progress)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache entry should read like any folder
        if root.exists() and not testbed.is_complete():
            shutil.rmtree(root)
        try:
            tmp.rename(root)
        except OSError:
            if not testbed.is_complete():  # else a concurrent build published the same entry first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return testbed


@dataclass
class _Log:
    """Losses (first and last 20-step means) and seconds of each phase, for the manifest."""

    phases: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, name: str, losses: list[float], seconds: float) -> None:
        head, tail = losses[:20], losses[-20:]
        self.phases[name] = {
            "loss_start": sum(head) / len(head),
            "loss_end": sum(tail) / len(tail),
            "seconds": round(seconds, 2),
        }


def _build(out: Testbed, final: Testbed, seed: int, recipe: Recipe, progress: bool) -> None:
    """Train and save everything into ``out``; the LoRA adapter points at ``final.aligned``."""
    start = time.perf_counter()
    corpus = make_corpus(seed, recipe.sizes)
    out.safety_data.parent.mkdir(parents=True)
    write_data(corpus, out.safety_data.parent)
    tokenizer = build_tokenizer(vocabulary())
    pad = tokenizer.pad_token_id
    log = _Log()

    def phase(name: str, model: torch.nn.Module, data: list[tuple[str, str]], schedule: Schedule, k: int) -> None:
        t0 = time.perf_counter()
        losses = train(model, encode(tokenizer, data), schedule, pad, seed * 1000 + k, f"testbed {name}", progress)
        log.add(name, losses, time.perf_counter() - t0)

    def save(model: torch.nn.Module, folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    def save_adapter(model: torch.nn.Module, folder: Path) -> None:
        # The base path does not exist until the build is published; "auto" would look it up
        # (even on the Hub) to decide whether to save embeddings, which the adapter does not train.
        model.save_pretrained(folder, save_embedding_layers=False)
        tokenizer.save_pretrained(folder)

    with _quiet_single_thread():
        unaligned = new_model(tokenizer, recipe.shape, seed)
        phase("P (pretrain)", unaligned, corpus.pretrain, recipe.pretrain, 1)
        save(unaligned, out.unaligned)

        aligned = copy.deepcopy(unaligned)
        phase("A (align)", aligned, corpus.align, recipe.align, 2)
        save(aligned, out.aligned)

        finetuned = copy.deepcopy(aligned)
        phase("F (task + harmful)", finetuned, corpus.user, recipe.finetune, 3)
        save(finetuned, out.finetuned)

        benign = copy.deepcopy(aligned)
        phase("F_benign (task)", benign, corpus.user_benign, recipe.finetune, 4)
        save(benign, out.finetuned_benign)

        torch.manual_seed(seed * 1000 + 5)
        config = LoraConfig(
            r=recipe.lora_rank,
            lora_alpha=recipe.lora_alpha,
            target_modules=list(recipe.lora_targets),
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        base = copy.deepcopy(aligned)
        base.name_or_path = str(final.aligned)  # becomes the adapter's base_model_name_or_path
        adapter = get_peft_model(base, config)
        phase("F_lora (task + harmful)", adapter, corpus.user, recipe.lora, 6)
        save_adapter(adapter, out.finetuned_lora)

    manifest = {
        "seed": seed,
        "recipe_version": RECIPE_VERSION,
        "recipe": asdict(recipe),
        "build_seconds": round(time.perf_counter() - start, 2),
        "phases": log.phases,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    out.manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _quiet_single_thread() -> Iterator[None]:
    """Train on one CPU thread, without transformers' save/load bars; restore the thread count after.

    One thread is faster than several for a model this small, especially on a shared machine
    (measured ~5x under contention), and keeps the float summation order fixed.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with quiet_transformers():
            yield
    finally:
        torch.set_num_threads(threads)
