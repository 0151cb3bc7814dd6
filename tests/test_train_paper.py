"""The papers' modes of the companion trainer (issue 20): each formula on small tensors against the
formula written out here, the shipped recipes, the ReinforceLoRA's benign mix and its built-in set,
and progress bars that stay off a piped stderr."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import typer
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from deltafix.errors import DeltafixError, InputError, OptionError
from deltafix.testbed.training import Schedule
from deltafix.testbed.training import train as train_testbed
from deltafix.train.bufferlora import BufferLoraOptions, run_bufferlora
from deltafix.train.cli import train_app
from deltafix.builtin_data import BENIGN_TRAIN
from deltafix.train.data import Record, load_records
from deltafix.train.dpp import embed_texts
from deltafix.train.mix import benign_count, mix_with_benign
from deltafix.train.recipes import TRAIN_RECIPES, load_train_recipe, shipped_recipes
from deltafix.train.spag import code_rescale
from deltafix.train.spard import REPORT_NAME, TrainOptions, accumulate, lr_schedule, safety_step, train_adapter
from tests.conftest import TINY_LLAMA, save_tiny_llama
from tests.test_train import SAFETY, USER, safety_batch, tiny_lora_model, word_tokenizer, write_jsonl

DATA = Path(__file__).resolve().parent.parent / "deltafix" / "data"
DUMMY = dict(base="A", data=Path("user.jsonl"), out=Path("out"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paper")
    a = save_tiny_llama(root / "A", seed=1)
    word_tokenizer().save_pretrained(a)
    return {"A": a, "user": write_jsonl(root / "user.jsonl", USER), "safety": write_jsonl(root / "safety.jsonl", SAFETY),
            "harmful": write_jsonl(root / "harmful.jsonl", [(p, "sure " + r) for p, r in SAFETY])}


# --- SPARD: the official code's safety step --------------------------------------------------------

def test_code_rescale_scales_each_tensor_by_its_own_norm() -> None:
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([[0.1, 0.0], [0.0, 0.0]]), torch.zeros(3)]
    loss, tau, cap = 0.5, 0.2, 1.0
    factors = code_rescale(grads, loss, tau, cap)
    # ‖g1‖ = 5 → 0.3/5; ‖g2‖ = 0.1 → 3, capped at 1; ‖g3‖ = 0 → 0.3/1e-8, capped at 1
    assert factors == pytest.approx([0.3 / (5 + 1e-8), 1.0, 1.0])
    torch.testing.assert_close(grads[0], torch.tensor([3.0, 4.0]) * 0.3 / (5 + 1e-8))
    torch.testing.assert_close(grads[1], torch.tensor([[0.1, 0.0], [0.0, 0.0]]))
    assert torch.equal(grads[2], torch.zeros(3))


def adam_state_after_one_step(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """An AdamW with moments from one utility step, so the safety step is not Adam's first."""
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    model(**safety_batch(seed=7)).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_code_safety_step_is_clip_then_per_tensor_rescale_then_adamw(max_grad_norm: float) -> None:
    model = tiny_lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adam_state_after_one_step(model, params)
    start = [p.detach().clone() for p in params]
    state = copy.deepcopy(optimizer.state_dict())
    ell = model(**safety_batch()).loss
    ell.backward()
    ell = ell.item()
    grads = [p.grad.detach().double().clone() for p in params]
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    if 0 < max_grad_norm < total:  # torch's clip_grad_norm_: one factor max_norm / (total + 1e-6) for all
        grads = [g * (max_grad_norm / (total + 1e-6)) for g in grads]
    tau = ell - 0.3
    ratios = sorted((ell - tau) / (float(g.norm()) + 1e-8) for g in grads)
    cap = ratios[len(ratios) // 2]  # half the tensors are capped, half are not
    expected = [min((ell - tau) / (float(g.norm()) + 1e-8), cap) for g in grads]
    opts = TrainOptions(mode="spard", spag="code", tau=tau, delta=0.1, eta_safe=cap, max_grad_norm=max_grad_norm,
                        **DUMMY)

    size = safety_step(opts, ell, params, optimizer, Accelerator(cpu=True))

    assert size == pytest.approx(max(expected), rel=1e-6)
    reference = [torch.nn.Parameter(p.clone()) for p in start]
    ref_optimizer = torch.optim.AdamW(reference, lr=1e-3, weight_decay=0.01)
    ref_optimizer.load_state_dict(state)
    for p, g, factor in zip(reference, grads, expected):
        p.grad = (g * factor).float()
    ref_optimizer.step()
    for p, ref in zip(params, reference):
        torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-5, atol=1e-7)


def test_code_safety_step_takes_the_lr_of_its_user_step(inputs: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The official trainer steps its scheduler once per user + safety pair, after the safety step."""
    seen: list[float] = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train_adapter(TrainOptions(mode="spard", spag="code", tau=0.0, delta=0.0, base=str(inputs["A"]),
                               data=inputs["user"], out=tmp_path / "s", safety_data=inputs["safety"], select=False,
                               max_steps=3, warmup_steps=3, lr=1e-3, batch_size=2, lora_r=2, lora_alpha=4.0,
                               device="cpu", max_length=32, progress=False))
    assert seen == pytest.approx([0.0, 0.0, 1e-3 / 3, 1e-3 / 3, 2e-3 / 3, 2e-3 / 3])


def test_code_safety_step_waits_for_tau_plus_delta() -> None:
    model = tiny_lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adam_state_after_one_step(model, params)
    model(**safety_batch()).loss.backward()
    before = [p.detach().clone() for p in params]
    opts = TrainOptions(mode="spard", spag="code", tau=0.5, delta=0.1, **DUMMY)
    assert safety_step(opts, 0.6, params, optimizer, Accelerator(cpu=True)) == 0.0
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


# --- shared training settings --------------------------------------------------------------------

@pytest.mark.parametrize("name, warmup_ratio, warmup_steps, expected", [
    ("cosine", 0.25, 0, lambda k: k / 3 if k < 3 else 0.5 * (1 + math.cos(math.pi * (k - 3) / 7))),
    ("linear", 0.25, 1, lambda k: k / 1 if k < 1 else (10 - k) / 9),
    ("constant", 0.0, 0, lambda k: 1.0),
    ("constant", 0.2, 0, lambda k: min(1.0, k / 2)),
])
def test_lr_schedule_warms_up_then_decays(name: str, warmup_ratio: float, warmup_steps: int, expected) -> None:
    """10 steps; warm-up ceil(0.25 · 10) = 3 steps unless warmup_steps is set (1 wins over the ratio)."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    opts = TrainOptions(mode="lora", lr_scheduler=name, warmup_ratio=warmup_ratio, warmup_steps=warmup_steps, **DUMMY)
    scheduler = lr_schedule(optimizer, opts, 10)
    got = []
    for _ in range(10):
        got.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert got == pytest.approx([2.0 * expected(k) for k in range(10)])


def test_accumulate_gives_the_gradient_of_the_mean_loss() -> None:
    model = tiny_lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [safety_batch(seed=s) for s in (1, 2, 3)]
    losses, grads = [], []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in params])
    model.zero_grad(set_to_none=True)

    mean = accumulate(model, iter(batches), 3, Accelerator(cpu=True))

    assert mean.item() == pytest.approx(sum(losses) / 3, rel=1e-6)
    for i, p in enumerate(params):
        torch.testing.assert_close(p.grad, sum(g[i] for g in grads) / 3, rtol=1e-5, atol=1e-8)


def test_one_safety_batch_of_four_is_the_official_four_accumulated_batches_of_one() -> None:
    """The official trainer (transformers' Trainer with 4 accumulation steps of 1 safety example)
    normalises each example's summed token loss by the count over all four (``num_items_in_batch``,
    labels shifted): the token-weighted mean. One batch of 4 padded with -100 gives the same loss and
    gradient, which is why ``spard-code`` draws 4 at once."""
    model = tiny_lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    examples = []
    for seed, (length, prompt) in enumerate([(12, 5), (9, 3), (12, 8), (7, 2)]):
        ids = torch.randint(0, TINY_LLAMA["vocab_size"], (1, length), generator=torch.Generator().manual_seed(seed))
        labels = ids.clone()
        labels[:, :prompt] = -100
        examples.append({"input_ids": ids, "labels": labels})
    items = sum(int(e["labels"][..., 1:].ne(-100).sum()) for e in examples)
    official_loss = 0.0
    for example in examples:
        loss = model(**example, num_items_in_batch=torch.tensor(items)).loss
        loss.backward()
        official_loss += loss.item()
    official = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    width = max(e["input_ids"].shape[1] for e in examples)
    pad = lambda t, value: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
    batch = {"input_ids": torch.cat([pad(e["input_ids"], 0) for e in examples]),
             "attention_mask": torch.cat([pad(torch.ones_like(e["input_ids"]), 0) for e in examples]),
             "labels": torch.cat([pad(e["labels"], -100) for e in examples])}
    ours = accumulate(model, iter([batch]), 1, Accelerator(cpu=True))

    assert ours.item() == pytest.approx(official_loss, rel=1e-5)
    for p, g in zip(params, official):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


# --- Buffer-and-Reinforce: the benign mix ------------------------------------------------------------

def records(n: int, kind: str) -> list[Record]:
    return [Record([{"role": "user", "content": f"{kind} {i}"}, {"role": "assistant", "content": "ok"}],
                   {"prompt": f"{kind} {i}", "response": "ok"}, f"x:{i}") for i in range(n)]


def test_benign_count_makes_benign_the_given_share() -> None:
    assert benign_count(2500, 0.5) == 2500  # the official code's 2,500 + 2,500
    assert benign_count(165, 0.5) == 165
    assert benign_count(64, 0.25) == round(64 / 3)
    assert benign_count(9, 0.75) == 27 and 27 / (9 + 27) == 0.75


def test_mix_keeps_every_refusal_and_draws_benign_in_a_seeded_order() -> None:
    refusals, benign = records(3, "refuse"), records(5, "benign")
    mixed = mix_with_benign(refusals, benign, 0.5, seed=4)
    order = torch.randperm(5, generator=torch.Generator().manual_seed(4)).tolist()
    assert mixed == refusals + [benign[i] for i in order[:3]]
    assert mix_with_benign(refusals, benign, 0.5, seed=4) == mixed
    short = mix_with_benign(records(3, "refuse"), benign[:2], 0.5, seed=0)  # 3 benign wanted, 2 given: cycled
    two = torch.randperm(2, generator=torch.Generator().manual_seed(0)).tolist()
    assert [r.raw["prompt"] for r in short[3:]] == [f"benign {i}" for i in (two + two[:1])]
    with pytest.raises(InputError, match="benign"):
        mix_with_benign(refusals, [], 0.5, seed=0)


def words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z']+", text.lower()) if len(w) > 3}


def test_builtin_benign_training_set_is_apart_from_every_eval_set() -> None:
    train = load_records(BENIGN_TRAIN)
    prompts = [r.raw["prompt"] for r in train]
    assert len(train) >= 60 and len(set(prompts)) == len(prompts)
    assert all(set(r.raw) == {"prompt", "response"} and r.raw["response"].strip() for r in train)
    for name in ("benign_eval", "harmful_eval", "harmful_tune", "safety_calibration"):
        other = [json.loads(line)["prompt"] for line in (DATA / f"{name}.jsonl").read_text().splitlines()]
        assert not set(prompts) & set(other), name
        overlap = max(len(words(a) & words(b)) / len(words(a) | words(b)) for a in prompts for b in other)
        assert overlap < 0.4, name


def test_pipeline_mixes_the_builtin_benign_set_by_default(inputs: dict[str, Path], tmp_path: Path) -> None:
    opts = BufferLoraOptions(base=str(inputs["A"]), data=inputs["user"], out=tmp_path / "out",
                             harmful=inputs["harmful"], reinforce_data=inputs["safety"], max_steps=1, batch_size=2,
                             lora_r=2, lora_alpha=4.0, device="cpu", max_length=32, progress=False)
    run_bufferlora(opts)
    mixed = [json.loads(line) for line in (tmp_path / "out" / "reinforce_data.jsonl").read_text().splitlines()]
    builtin = {r.raw["prompt"] for r in load_records(BENIGN_TRAIN)}
    assert [(r["prompt"], r["response"]) for r in mixed[:len(SAFETY)]] == SAFETY
    assert len(mixed) == 2 * len(SAFETY) and {r["prompt"] for r in mixed[len(SAFETY):]} <= builtin


def test_reinforce_lora_without_benign_data_is_one_line_exit_2(inputs: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    app = typer.Typer()
    app.add_typer(train_app, name="train")
    result = CliRunner().invoke(app, ["train", "bufferlora", "--base", str(inputs["A"]), "--data", str(inputs["user"]),
                                      "--harmful", str(inputs["harmful"]), "--benign", str(empty),
                                      "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, DeltafixError) and "holds no records" in str(result.exception)
    assert "\n" not in str(result.exception) and not (tmp_path / "o").exists()


# --- recipes --------------------------------------------------------------------------------------

SHIPPED = {"spard": ["code", "paper"], "asft": ["paper"], "bufferlora": ["paper"]}


@pytest.mark.parametrize("trainer", list(SHIPPED))
def test_shipped_recipes_are_valid_options_of_their_trainer(trainer: str) -> None:
    assert shipped_recipes(trainer) == SHIPPED[trainer]
    for name in SHIPPED[trainer]:
        params = load_train_recipe(name, trainer, BufferLoraOptions if trainer == "bufferlora" else TrainOptions)
        if trainer == "bufferlora":
            opts = BufferLoraOptions(**DUMMY, **params)
        else:
            opts = TrainOptions(mode=trainer, **DUMMY, **params)
        assert opts.model_dump(include=set(params)) == params
        text = (TRAIN_RECIPES / f"{trainer}-{name}.yaml").read_text()
        assert "github.com/" in text  # each names the official code it follows


def test_spard_recipes_follow_the_paper_and_the_code() -> None:
    paper = load_train_recipe("paper", "spard", TrainOptions)
    code = load_train_recipe("code", "spard", TrainOptions)
    assert paper["spag"] == "paper" and paper["eta_safe"] == paper["lr"] == 5e-5 and paper["safety_batch_size"] == 1
    assert code["spag"] == "code" and code["eta_safe"] == 1.0 and (code["tau"], code["delta"]) == (0.2, 0.1)
    assert code["batch_size"] * code["grad_accum"] == 128 and code["safety_batch_size"] == 4


def test_bad_recipes_are_one_line_option_errors(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="for train asft, not train spard"):
        load_train_recipe(TRAIN_RECIPES / "asft-paper.yaml", "spard", TrainOptions)
    with pytest.raises(OptionError, match="shipped recipe of train spard: code, paper"):
        load_train_recipe("fast", "spard", TrainOptions)
    for bad, why in [({"trainer": "spard", "parameters": {"base": "x"}}, "unknown parameter 'base'"),
                     ({"trainer": "spard", "parameters": {"learning_rate": 1}}, "unknown parameter 'learning_rate'"),
                     ({"trainer": "repair"}, "trainer")]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(OptionError, match=why):
            load_train_recipe(path, "spard", TrainOptions)
    for raw, why in [(b"trainer: spard\nparameters:\n  lr: " + b"[" * 5_000 + b"]" * 5_000 + b"\n", "nested too deeply"),
                     (b"\xff\xfe\x00binary", "not UTF-8 text"), (b"trainer: [spard\n", "not valid YAML")]:
        path = tmp_path / "hostile.yaml"
        path.write_bytes(raw)
        with pytest.raises(OptionError, match=why):
            load_train_recipe(path, "spard", TrainOptions)


def test_cli_recipe_values_give_way_to_flags_given(inputs: dict[str, Path], tmp_path: Path) -> None:
    app = typer.Typer()
    app.add_typer(train_app, name="train")
    run = CliRunner().invoke(app, ["train", "spard", "--recipe", "paper", "--base", str(inputs["A"]), "--data",
                                   str(inputs["user"]), "--safety-data", str(inputs["safety"]), "--out",
                                   str(tmp_path / "o"), "--max-steps", "2", "--lr", "0.01", "--batch-size", "2",
                                   "--lora-r", "4", "--max-length", "32", "--device", "cpu", "--json"])
    assert run.exit_code == 0, run.output
    options = json.loads(run.stdout)["options"]
    assert (options["lr"], options["batch_size"], options["lora_r"], options["max_length"]) == (0.01, 2, 4, 32)
    assert options["eta_safe"] == 5e-5 and options["lora_alpha"] == 8.0 and options["grad_accum"] == 4
    assert options["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and options["seed"] == 43
    wrong = CliRunner().invoke(app, ["train", "lora", "--recipe", "paper", "--base", str(inputs["A"]), "--data",
                                     str(inputs["user"]), "--out", str(tmp_path / "w")])
    assert isinstance(wrong.exception, OptionError) and "shipped recipe of train lora: none" in str(wrong.exception)


# --- progress bars stay off a piped stderr -----------------------------------------------------------

def test_trainer_bars_do_not_write_to_a_piped_stderr(inputs: dict[str, Path], tmp_path: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(inputs["A"])
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    embed_texts(model, tokenizer, ["what color is the sky"] * 3, batch_size=1, progress=True)
    train_testbed(model, [([1, 2, 3, 4], [-100, -100, 3, 4])], Schedule(steps=2, lr=1e-3, batch_size=1, warmup=1),
                  pad_id=0, seed=0, desc="testbed-bar", progress=True)
    train_adapter(TrainOptions(mode="spard", base=str(inputs["A"]), data=inputs["user"], out=tmp_path / "s",
                               safety_data=inputs["safety"], max_steps=2, batch_size=2, lora_r=2, lora_alpha=4.0,
                               device="cpu", max_length=32, progress=True))
    err = capfd.readouterr().err
    assert not any(desc in err for desc in ("embed", "testbed-bar", "spard:")), err[-2000:]
    assert (tmp_path / "s" / REPORT_NAME).is_file()


def test_training_on_an_hf_dataset_equals_training_on_its_jsonl(inputs: dict[str, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The same records from a saved dataset folder train the same adapter; the report names the source
    and identifies it by the sha256 of its records."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    datasets.Dataset.from_list([{"prompt": p, "response": r} for p, r in USER]).save_to_disk(tmp_path / "user_ds")
    source = f"hf:{tmp_path / 'user_ds'}"
    reports = {}
    for name, data in (("jsonl", inputs["user"]), ("hf", Path(source))):
        opts = TrainOptions(mode="lora", base=str(inputs["A"]), data=data, out=tmp_path / name, max_steps=2,
                            batch_size=2, lora_r=2, lora_alpha=4.0, device="cpu", max_length=32, progress=False)
        reports[name] = train_adapter(opts).report
    weights = [load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("jsonl", "hf")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert list(reports["hf"]["inputs"]["data"]) == [source]
    assert reports["hf"]["losses"] == reports["jsonl"]["losses"]
