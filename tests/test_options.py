"""No option default is written twice: each lives in ``deltafix.options``, and the command line,
the Python API, the options dataclasses and pydantic models, and the shipped recipes all carry
that one value (issue 19). A second copy is how a help text, a library default and a recipe drift
apart without any test noticing, so this checks the readers and greps for stray copies."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from deltafix import options
from deltafix.api import repair
from deltafix.cli import app
from deltafix.engine.merge_lora import MergeOptions, QrMergeParams
from deltafix.engine.pipeline import RepairOptions
from deltafix.evaluation.evaluate import evaluate_folder
from deltafix.evaluation.gate import gate
from deltafix.hub.push import cli_gate
from deltafix.io.writer import parse_size
from deltafix.methods import get_method, method_names
from deltafix.train.bufferlora import BufferLoraOptions
from deltafix.train.dpp import select_subset
from deltafix.train.spard import TrainOptions

PACKAGE = Path(options.__file__).resolve().parent
RECIPES = PACKAGE / "recipes"

TRAINING = {"epochs": options.EPOCHS, "lr": options.LEARNING_RATE, "batch_size": options.TRAIN_BATCH_SIZE,
            "lora_r": options.LORA_R, "lora_alpha": options.LORA_ALPHA, "seed": options.TRAIN_SEED,
            "device": options.DEVICE, "dtype": options.DTYPE, "max_length": options.TRAIN_MAX_LENGTH,
            "grad_accum": options.GRAD_ACCUM, "weight_decay": options.WEIGHT_DECAY,
            "warmup_steps": options.WARMUP_STEPS, "max_grad_norm": options.MAX_GRAD_NORM}
"""The LoRA training flags every ``deltafix train`` trainer takes, by parameter name."""
SCHEDULE = {"lr_scheduler": options.LR_SCHEDULER, "warmup_ratio": options.WARMUP_RATIO,
            "lora_dropout": options.LORA_DROPOUT}
BUFFERLORA = {"lr_scheduler": options.BUFFERLORA_LR_SCHEDULER, "warmup_ratio": options.BUFFERLORA_WARMUP_RATIO,
              "lora_dropout": options.BUFFERLORA_LORA_DROPOUT, "benign_share": options.BENIGN_SHARE}
"""The schedule and dropout of the single trainers, and the pipeline's own (the official scripts')."""
JUDGE = {"judge": options.EVAL_JUDGE}
SPARD = {"p": options.DPP_P, "beta": options.DPP_BETA, "tau": options.SPAG_TAU, "eta_safe": options.ETA_SAFE,
         "spag": options.SPAG_VARIANT, "delta": options.SPAG_DELTA}
MERGE = {"alpha": options.MERGE_ALPHA, "scale": options.MERGE_SCALE}

COMMAND_DEFAULTS: dict[tuple[str, ...], dict[str, Any]] = {
    ("repair",): {"out_shard_size": options.OUT_SHARD_SIZE, "device": options.DEVICE, "dtype": options.DTYPE,
                  "utility_samples": options.UTILITY_SAMPLES},
    ("hub",): {"out_shard_size": options.OUT_SHARD_SIZE, "device": options.DEVICE, "dtype": options.DTYPE,
               "utility_samples": options.UTILITY_SAMPLES, "max_asr": options.DEFAULT_MAX_ASR},
    ("merge-lora",): {"out_shard_size": options.OUT_SHARD_SIZE},
    ("eval",): {"max_new_tokens": options.EVAL_MAX_NEW_TOKENS, "batch_size": options.EVAL_BATCH_SIZE,
                "device": options.DEVICE, **JUDGE},
    ("gate",): {"max_asr": options.DEFAULT_MAX_ASR, "max_new_tokens": options.EVAL_MAX_NEW_TOKENS,
                "batch_size": options.EVAL_BATCH_SIZE, "device": options.DEVICE, **JUDGE},
    ("train", "select"): {"p": options.DPP_P, "beta": options.DPP_BETA, "batch_size": options.DPP_BATCH_SIZE,
                          "device": options.DEVICE, "dtype": options.DTYPE},
    ("train", "spard"): {**TRAINING, **SCHEDULE, **SPARD},
    ("train", "asft"): {**TRAINING, **SCHEDULE, "lam": options.ASFT_TRAIN_LAM},
    ("train", "lora"): {**TRAINING, **SCHEDULE},
    ("train", "bufferlora"): {**TRAINING, **BUFFERLORA, **MERGE, "out_shard_size": options.OUT_SHARD_SIZE},
}
"""Per command: each option whose default is a shared constant, by parameter name."""

SHOWN_DEFAULTS: dict[tuple[tuple[str, ...], str], str] = {
    (("hub",), "min_benign_help"): str(options.DEFAULT_MIN_BENIGN_HELP),
    (("gate",), "min_benign_help"): str(options.DEFAULT_MIN_BENIGN_HELP),
    (("hub",), "max_utility_drop"): f"{options.DEFAULT_MAX_UTILITY_DROP} with --utility",
    (("gate",), "max_utility_drop"): f"{options.DEFAULT_MAX_UTILITY_DROP} with --reference",
    (("merge-lora",), "alpha"): f"{options.MERGE_ALPHA}, or the recipe's",
    (("merge-lora",), "scale"): f"{options.MERGE_SCALE}, or the recipe's",
}
"""Options whose default is resolved later (None on the command line) and shown in --help."""


def command(path: tuple[str, ...]) -> Any:
    """The click command at ``path`` (typer's vendored click: its classes are not ``click``'s)."""
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def param(path: tuple[str, ...], name: str) -> Any:
    (found,) = [p for p in command(path).params if p.name == name]
    return found


def field_defaults(cls: type) -> dict[str, Any]:
    """Defaults of a dataclass's or pydantic model's fields (factories called)."""
    if dataclasses.is_dataclass(cls):
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    return {name: f.get_default(call_default_factory=True) for name, f in cls.model_fields.items()
            if not f.is_required()}


def keyword_defaults(fn: Any) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("path", list(COMMAND_DEFAULTS), ids=[" ".join(p) for p in COMMAND_DEFAULTS])
def test_command_line_defaults_are_the_constants(path: tuple[str, ...]) -> None:
    expected = COMMAND_DEFAULTS[path]
    assert {name: param(path, name).default for name in expected} == expected
    if "target_modules" in {p.name for p in command(path).params}:
        assert param(path, "target_modules").default == ",".join(options.LORA_TARGETS)


@pytest.mark.parametrize("key", list(SHOWN_DEFAULTS), ids=[f"{' '.join(p)} {n}" for p, n in SHOWN_DEFAULTS])
def test_help_shows_the_constants(key: tuple[tuple[str, ...], str]) -> None:
    path, name = key
    assert param(path, name).default is None
    assert getattr(param(path, name), "show_default") == SHOWN_DEFAULTS[key]


def test_shard_size_string_and_bytes_agree() -> None:
    assert options.OUT_SHARD_BYTES == parse_size(options.OUT_SHARD_SIZE)


@pytest.mark.parametrize("cls, expected", [
    (RepairOptions, {"shard_size": options.OUT_SHARD_BYTES, "device": options.DEVICE, "dtype": options.DTYPE,
                     "utility_samples": options.UTILITY_SAMPLES}),
    (MergeOptions, {"shard_size": options.OUT_SHARD_BYTES, **MERGE}),
    (QrMergeParams, MERGE),
    (TrainOptions, {**TRAINING, **SCHEDULE, **SPARD, "lam": options.ASFT_TRAIN_LAM,
                    "target_modules": list(options.LORA_TARGETS)}),
    (BufferLoraOptions, {**TRAINING, **BUFFERLORA, **MERGE, "shard_size": options.OUT_SHARD_BYTES,
                         "target_modules": list(options.LORA_TARGETS)}),
], ids=lambda value: getattr(value, "__name__", ""))
def test_options_classes_carry_the_constants(cls: type, expected: dict[str, Any]) -> None:
    defaults = field_defaults(cls)
    assert {name: defaults[name] for name in expected} == expected


@pytest.mark.parametrize("fn, expected", [
    (repair, {"out_shard_size": options.OUT_SHARD_SIZE, "device": options.DEVICE, "dtype": options.DTYPE,
              "utility_samples": options.UTILITY_SAMPLES}),
    (gate, {"max_asr": options.DEFAULT_MAX_ASR}),
    (evaluate_folder, {"max_new_tokens": options.EVAL_MAX_NEW_TOKENS, "batch_size": options.EVAL_BATCH_SIZE,
                       "device": options.DEVICE}),
    (cli_gate, {"device": options.DEVICE}),
    (select_subset, {"p": options.DPP_P, "beta": options.DPP_BETA, "batch_size": options.DPP_BATCH_SIZE}),
], ids=lambda value: getattr(value, "__name__", ""))
def test_library_keywords_carry_the_constants(fn: Any, expected: dict[str, Any]) -> None:
    defaults = keyword_defaults(fn)
    assert {name: defaults[name] for name in expected} == expected


@pytest.mark.parametrize("method", method_names())
def test_shipped_recipe_is_the_code_default(method: str) -> None:
    """``--recipe METHOD`` and ``--method METHOD`` run the same repair: key for key, the shipped
    recipe's values are the parameter model's defaults (pick one with measurements, change both)."""
    recipe = yaml.safe_load((RECIPES / f"{method}.yaml").read_text())
    assert recipe["method"] == method
    assert recipe["parameters"] == get_method(method).params().model_dump(mode="json")


STRAY = {
    "the shard size in bytes": re.compile(r"\b5 \* 10 \*\* 9\b|\b5000000000(?:\.0)?\b"),
    "the shard size as written": re.compile(r"""(["'])5 ?GB\1"""),
    "a gate threshold": re.compile(r"\b(?:max_asr|min_benign_help|max_utility_drop|DEFAULT_MAX_ASR|"
                                   r"DEFAULT_MIN_BENIGN_HELP|DEFAULT_MAX_UTILITY_DROP)\b[^=\n(]*=\s*(?:0\.05|0\.9|0\.02)\b"),
    "a LoRA training default": re.compile(r"\b(?:lora_r|lora_alpha|lr|epochs|max_length)\b: [^=\n]*=\s*"
                                          r"(?:Field\()?(?:32|64(?:\.0)?|0\.0001|1024)\b"),
    "the QR-merge alpha or scale": re.compile(r"^\s*(?:ALPHA|SCALE) = \d", re.MULTILINE),
    "the LoRA targets": re.compile(r"""(["'])q_proj\1, \1v_proj\1|(["'])q_proj,v_proj"""),
}
"""Copies of the shared defaults' values as code restates them, matched in ``code_of``'s
normalised form (``5 * 10**9`` is ``5 * 10 ** 9`` there, ``1e-4`` is ``0.0001``)."""


def code_of(path: Path) -> str:
    """The module's code alone, normalised by ``ast.unparse``: no comments, no docstrings (whose
    examples may well say ``5GB``), one spelling per number and quote."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list):
                block[:] = [ast.Pass() if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                            and isinstance(stmt.value.value, str) else stmt for stmt in block]
    return ast.unparse(tree)


def test_stray_patterns_catch_a_restated_default(tmp_path: Path) -> None:
    """The patterns match what a second copy would look like, and not the same text in a docstring."""
    module = tmp_path / "copy.py"
    module.write_text('''"""Shards like "5GB" or 5 * 10**9 bytes."""
SHARD = 5 * 10**9
SIZE = "5GB"
def gate(max_asr: float = 0.05): ...
def train(epochs: int = 1, lora_r: int = 32): ...
class Train:
    lr: float = Field(1e-4, gt=0)
ALPHA = 0.1
TARGETS = ["q_proj", "v_proj"]
''')
    found = sorted(what for what, pattern in STRAY.items() if pattern.search(code_of(module)))
    assert found == sorted(STRAY)
    module.write_text('"""Shards like "5GB" or 5 * 10**9 bytes."""\n# max_asr: float = 0.05\n')
    assert not any(pattern.search(code_of(module)) for pattern in STRAY.values())


def test_no_default_is_restated_in_the_package() -> None:
    hits = [f"{path.relative_to(PACKAGE.parent)}: {what}: {match.group(0).strip()}"
            for path in sorted(PACKAGE.rglob("*.py")) if path != Path(options.__file__).resolve()
            for what, pattern in STRAY.items() for match in pattern.finditer(code_of(path))]
    assert hits == []


@pytest.mark.parametrize("module", ["cli.py", "train/cli.py"])
def test_command_line_defaults_are_named_not_literal(module: str) -> None:
    """A number or a string as a typer default is a value that options.py does not hold."""
    tree = ast.parse((PACKAGE / module).read_text())

    def literal(node: ast.AST | None) -> bool:
        """A number or a string that is no flag name (``Annotated`` options start with the flag)."""
        return (isinstance(node, ast.Constant) and type(node.value) in (int, float, str)
                and not str(node.value).startswith("-"))

    option_calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                    and ast.unparse(node.func) == "typer.Option" and node.args]
    bad = [ast.unparse(call) for call in option_calls if literal(call.args[0])]
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                 and any(ast.unparse(d).startswith(("app.command", "train_app.command")) for d in node.decorator_list)]
    bad += [f"{fn.name}: {ast.unparse(default)}" for fn in functions
            for default in [*fn.args.defaults, *fn.args.kw_defaults] if literal(default)]
    assert bad == []
