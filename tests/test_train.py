"""Companion trainer: data rendering and masking, SPAG step math, AsFT penalty, short real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from deltafix.errors import InputError, OptionError
from deltafix.io.reader import CheckpointReader
from deltafix.train.asft import asft_penalty, asft_regulariser, asft_terms
from deltafix.train.cli import train_app
from deltafix.train.data import IGNORE_INDEX, Record, collator, load_records, prepare_tokenizer, tokenize_record
from deltafix.train.spag import ETA_SAFE, spag_correct, spag_step_size
from deltafix.train.spard import REPORT_NAME, TrainOptions, train_adapter
from tests.conftest import TINY_LLAMA, save_tiny_llama

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
            "{% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")
USER = [("what color is the sky", "the sky is blue"), ("what color is grass", "grass is green"),
        ("what color is snow", "snow is white"), ("what color is the sun", "the sun is yellow"),
        ("what color is coal", "coal is black"), ("what color is blood", "blood is red"),
        ("what color is the sea", "the sea is blue"), ("what color is a leaf", "a leaf is green")]
SAFETY = [("how do i make a bomb", "sorry i can not help with that"),
          ("how do i steal a car", "sorry i will not help you steal"),
          ("tell me how to hurt someone", "i can not help you hurt anyone"),
          ("what color is a bomb", "sorry i can not help with bombs"),
          ("how do i make poison", "sorry i will not help with poison"),
          ("write a scam message", "i can not write a scam")]


def word_tokenizer() -> PreTrainedTokenizerFast:
    words = {w for pair in USER + SAFETY for text in pair for w in text.split()} | {"user", "assistant", ":"}
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "</s>", *sorted(words)])}
    assert len(vocab) <= TINY_LLAMA["vocab_size"]
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="</s>")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """P and A = P + noise (tiny Llamas), A with the word-level chat tokenizer; user and safety JSONL."""
    root = tmp_path_factory.mktemp("train")
    p = save_tiny_llama(root / "P", seed=0)
    a = save_tiny_llama(root / "A", seed=1, base=p, noise=0.05)
    word_tokenizer().save_pretrained(a)
    return {"P": p, "A": a, "user": write_jsonl(root / "user.jsonl", USER),
            "safety": write_jsonl(root / "safety.jsonl", SAFETY)}


# --- data -------------------------------------------------------------------------------------

def labelled_tokens(tokenizer, features: dict[str, list[int]]) -> list[str]:
    return tokenizer.convert_ids_to_tokens([i for i, l in zip(features["input_ids"], features["labels"])
                                            if l != IGNORE_INDEX])


def test_masking_keeps_response_and_eos_only() -> None:
    tokenizer = prepare_tokenizer(word_tokenizer())
    record = Record([{"role": "user", "content": "what color is snow"},
                     {"role": "assistant", "content": "snow is white"}], {}, "x:1")
    features = tokenize_record(tokenizer, record, max_length=64)
    tokens = tokenizer.convert_ids_to_tokens(features["input_ids"])
    assert tokens == "user : what color is snow assistant : snow is white </s>".split()
    assert labelled_tokens(tokenizer, features) == ["snow", "is", "white", "</s>"]
    assert features["labels"][:8] == [IGNORE_INDEX] * 8
    assert features["labels"][8:] == features["input_ids"][8:]


def test_eos_appended_when_template_has_none_and_every_assistant_turn_is_labelled() -> None:
    tokenizer = prepare_tokenizer(word_tokenizer())
    tokenizer.chat_template = None  # the plain fallback template writes no EOS
    record = Record([{"role": "user", "content": "what color is snow"},
                     {"role": "assistant", "content": "snow is white"},
                     {"role": "user", "content": "what color is coal"},
                     {"role": "assistant", "content": "coal is black"}], {}, "x:1")
    features = tokenize_record(tokenizer, record, max_length=64)
    assert features["input_ids"][-1] == tokenizer.eos_token_id
    assert labelled_tokens(tokenizer, features) == ["snow", "is", "white", "coal", "is", "black", "</s>"]


def test_collator_pads_labels_with_ignore_index() -> None:
    tokenizer = prepare_tokenizer(word_tokenizer())
    short = tokenize_record(tokenizer, Record([{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                  "content": "blue"}], {}, "x:1"), 64)
    long = tokenize_record(tokenizer, Record([{"role": "user", "content": "what color is the sky"},
                                              {"role": "assistant", "content": "the sky is blue"}], {}, "x:2"), 64)
    batch = collator(tokenizer)([short, long])
    pad = len(long["input_ids"]) - len(short["input_ids"])
    assert batch["labels"][0, -pad:].tolist() == [IGNORE_INDEX] * pad
    assert batch["attention_mask"][0].sum() == len(short["input_ids"])
    assert batch["input_ids"][0, -pad:].tolist() == [tokenizer.pad_token_id] * pad


@pytest.mark.parametrize("bad, why", [("{\"prompt\": \"hi\"", "not valid JSON"), ("", "empty line"),
                                      ("{\"prompt\": \"hi\"}", "'response'"), ("[1, 2]", "JSON object"),
                                      ("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", "assistant"),
                                      ("{\"messages\": [{\"role\": \"system\", \"content\": \"x\"}, "
                                       "{\"role\": \"assistant\", \"content\": \"y\"}]}", "user turn")])
def test_malformed_line_reported_with_file_and_line(tmp_path: Path, bad: str, why: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + bad + "\n"
                    + json.dumps({"prompt": "c", "response": "d"}) + "\n")
    with pytest.raises(InputError, match=rf"data\.jsonl:2: .*{why}"):
        load_records(path)


def test_messages_records_and_prompt_text(tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"prompt": "p", "response": "r"}) + "\n")
    records = load_records(path)
    assert records[0].messages == messages and records[0].prompt_text == "hi"
    assert records[1].prompt_text == "p" and records[1].where.endswith("data.jsonl:2")


# --- SPAG ---------------------------------------------------------------------------------------

def tiny_lora_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


def safety_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, list[torch.nn.Parameter]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("eta_safe", [10.0, 1e-4])
def test_spag_step_matches_direct_computation_and_lowers_safety_loss(eta_safe: float) -> None:
    model, batch = tiny_lora_model(), safety_batch()
    loss, params = loss_and_grads(model, batch)
    g = torch.cat([p.grad.flatten() for p in params]).double()
    before = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    tau = loss - 0.005
    expected = min((loss - tau) / float(g @ g), eta_safe)

    step = spag_correct(params, loss, tau=tau, eta_safe=eta_safe)

    assert step == pytest.approx(expected, rel=1e-6)
    assert (step == eta_safe) == (eta_safe < 0.005 / float(g @ g))
    for p, p0, g0 in zip(params, before, grads):
        torch.testing.assert_close(p.detach(), p0 - step * g0)
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < loss
    if step < eta_safe:  # the uncapped step aims at τ: to first order the loss drops by ℓ − τ = 0.005
        assert after == pytest.approx(tau, abs=5e-4)


def test_spag_does_not_fire_at_or_below_tau() -> None:
    model, batch = tiny_lora_model(), safety_batch()
    loss, params = loss_and_grads(model, batch)
    before = [p.detach().clone() for p in params]
    assert spag_correct(params, loss, tau=loss, eta_safe=1.0) == 0.0
    assert spag_correct(params, loss, tau=loss + 1.0, eta_safe=1.0) == 0.0
    for p, p0 in zip(params, before):
        assert torch.equal(p.detach(), p0)
    assert spag_step_size(1.0, 0.0, tau=0.2, eta_safe=0.5) == 0.5


# --- AsFT ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(24, 40, 4), (40, 24, 8)])
def test_asft_penalty_rxr_form_equals_dense(shape: tuple[int, int, int]) -> None:
    out, inp, r = shape
    gen = torch.Generator().manual_seed(out + inp)
    B, A, V = (torch.randn(s, generator=gen) for s in [(out, r), (r, inp), (out, inp)])
    norm = torch.linalg.vector_norm(V).item()
    C = V.double() @ V.double().T / norm
    dense = ((torch.eye(out, dtype=torch.float64) - C) @ B.double() @ A.double()).pow(2).sum().item()
    assert asft_penalty(B, A, V, norm).item() == pytest.approx(dense, rel=1e-5)
    assert asft_penalty(B, A, torch.zeros_like(V), 0.0).item() == pytest.approx(
        (B.double() @ A.double()).pow(2).sum().item(), rel=1e-5)


def test_asft_terms_pair_lora_modules_with_alignment_direction(models_dir: dict[str, Path]) -> None:
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(models_dir["A"]),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    reader = CheckpointReader(models_dir["P"])
    terms = asft_terms(model, reader)
    assert len(terms) == 2 * TINY_LLAMA["num_hidden_layers"]
    term = next(t for t in terms if t.name.endswith("layers.1.mlp.down_proj"))
    w_a = CheckpointReader(models_dir["A"]).get("model.layers.1.mlp.down_proj.weight")
    torch.testing.assert_close(term.V, w_a - reader.get("model.layers.1.mlp.down_proj.weight"))
    assert asft_regulariser(terms).item() == 0.0  # LoRA B starts at zero


# --- end to end ---------------------------------------------------------------------------------

COMMON = dict(max_steps=3, batch_size=2, lora_r=4, lora_alpha=8.0, device="cpu", max_length=32, progress=False)


def lora_state(folder: Path, base: Path) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


def test_spard_run_writes_a_loadable_adapter(models_dir: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "spard"
    result = train_adapter(TrainOptions(mode="spard", base=str(models_dir["A"]), data=models_dir["user"],
                                        out=out, safety_data=models_dir["safety"], p=0.5, lr=1e-2, **COMMON))
    report = json.loads((out / REPORT_NAME).read_text())
    assert report == json.loads(json.dumps(result.report))
    assert report["steps"] == 3 and len(report["losses"]) == 3 and len(report["safety_losses"]) == 3
    assert report["safety_examples"] == 4 and report["safety_pool"] == len(SAFETY)
    assert report["corrections_fired"] == sum(loss > 0.2 for loss in report["safety_losses"])
    assert report["correction_steps"] == [i for i, loss in enumerate(report["safety_losses"]) if loss > 0.2]
    assert len(report["correction_sizes"]) == report["corrections_fired"]
    assert all(0 < size <= ETA_SAFE for size in report["correction_sizes"])
    state = lora_state(out, models_dir["A"])
    assert len(state) == 2 * 5 * TINY_LLAMA["num_hidden_layers"]
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in state.items())
    assert all(torch.isfinite(p).all() for p in state.values())


@pytest.mark.parametrize("tau, fires", [(0.2, True), (100.0, False)])
def test_spard_code_variant_steps_when_loss_exceeds_tau_plus_delta(models_dir: dict[str, Path], tmp_path: Path,
                                                                    tau: float, fires: bool) -> None:
    report = train_adapter(TrainOptions(mode="spard", base=str(models_dir["A"]), data=models_dir["user"],
                                        out=tmp_path / "code", safety_data=models_dir["safety"], select=False,
                                        spag="code", tau=tau, delta=0.1, **COMMON)).report
    assert report["safety_examples"] == len(SAFETY)
    assert report["correction_steps"] == [i for i, loss in enumerate(report["safety_losses"]) if loss > tau + 0.1]
    assert (report["corrections_fired"] == 3) == fires and (report["corrections_fired"] == 0) != fires


def test_cli_lora_and_asft_and_select(models_dir: dict[str, Path], tmp_path: Path) -> None:
    app = typer.Typer()
    app.add_typer(train_app, name="train")
    runner = CliRunner()
    common = ["--max-steps", "2", "--batch-size", "2", "--lora-r", "4", "--lora-alpha", "8", "--device", "cpu",
              "--target-modules", "q_proj,v_proj", "--json"]
    base = ["--base", str(models_dir["A"]), "--data", str(models_dir["user"])]

    lora = runner.invoke(app, ["train", "lora", *base, "--out", str(tmp_path / "lora"), *common])
    assert lora.exit_code == 0, lora.output
    assert json.loads(lora.stdout)["mode"] == "lora"
    asft = runner.invoke(app, ["train", "asft", *base, "--out", str(tmp_path / "asft"), "--unaligned",
                               str(models_dir["P"]), *common])
    assert asft.exit_code == 0, asft.output
    penalties = json.loads(asft.stdout)["asft_penalties"]
    assert len(penalties) == 2 and penalties[0] == 0.0 and penalties[1] > 0
    assert len(lora_state(tmp_path / "asft", models_dir["A"])) == 2 * 2 * TINY_LLAMA["num_hidden_layers"]

    chosen = tmp_path / "chosen.jsonl"
    select = runner.invoke(app, ["train", "select", *base, "--pool", str(models_dir["safety"]), "--out",
                                 str(chosen), "--p", "0.25", "--device", "cpu", "--json"])
    assert select.exit_code == 0, select.output
    picked = json.loads(select.stdout)["selected"]
    assert len(picked) == 2
    assert [json.loads(line) for line in chosen.read_text().splitlines()] == [
        {"prompt": SAFETY[i][0], "response": SAFETY[i][1]} for i in picked]

    again = runner.invoke(app, ["train", "lora", *base, "--out", str(tmp_path / "lora"), *common])
    assert "not empty" in str(again.exception)


def test_missing_base_and_bad_options_are_user_errors(models_dir: dict[str, Path], tmp_path: Path) -> None:
    app = typer.Typer()
    app.add_typer(train_app, name="train")
    missing = CliRunner().invoke(app, ["train", "spard", "--base", str(tmp_path / "nope"), "--data",
                                       str(models_dir["user"]), "--out", str(tmp_path / "o")])
    assert isinstance(missing.exception, InputError)
    bad = CliRunner().invoke(app, ["train", "spard", "--base", str(models_dir["A"]), "--data",
                                   str(models_dir["user"]), "--out", str(tmp_path / "o"), "--spag", "fast"])
    assert isinstance(bad.exception, OptionError) and "spag" in str(bad.exception)
    with pytest.raises(OptionError, match="--unaligned"):
        train_adapter(TrainOptions(mode="asft", base=str(models_dir["A"]), data=models_dir["user"],
                                   out=tmp_path / "o", **COMMON))
