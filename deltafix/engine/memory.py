"""What a repair will hold in host memory, part by part, for ``--dry-run`` (issue 18).

A run goes through phases that never overlap: screening the user's data (A loaded whole and
generating), calibration (one decoder layer at a time, ``deltafix.calibration.capture``), the
sequential solve (``deltafix.engine.sequential``), the streaming repair (``deltafix.engine.stream``),
and, with an ``auto`` knob or ``--front``, a probe model beside the stream. The peak is the process
baseline plus the largest phase; each phase below is one function (``add_*``) whose docstring
says what its parts count, read off the code that allocates them. Every byte counted is host memory: on an accelerator the
activations, layers and Grams live on the device instead, so the host figure is then an upper bound.

The baseline is measured, not modelled: the RSS of this process now, plus what importing the
calibration stack (transformers, accelerate, the model's modelling code) and building a skeleton
add when the run will need them and this process has not loaded them yet. On a small model the
baseline is most of the peak (about 250 MB for Python with torch, 350 MB with the calibration stack).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from deltafix.calibration.templates import SafetyTemplate
from deltafix.engine import stream
from deltafix.errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel

    from deltafix.engine.plan import Plan
    from deltafix.methods import Method, MethodParams

FP32 = 4
"""Bytes per element: calibration, the sequential solve and the methods all compute in fp32 on CPU."""
BASELINE = "baseline"


@dataclass(frozen=True)
class MemoryPart:
    """One thing held in memory: which phase holds it, its bytes and, in words, what it is."""

    phase: str
    name: str
    bytes: int
    what: str


@dataclass
class MemoryEstimate:
    """The parts of a run's host memory; ``peak_bytes`` is the baseline plus the largest phase."""

    parts: list[MemoryPart] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, phase: str, name: str, nbytes: int, what: str) -> None:
        self.parts.append(MemoryPart(phase, name, int(nbytes), what))

    def phase_bytes(self) -> dict[str, int]:
        """Bytes per phase, baseline excluded, in the order the run meets them."""
        totals: dict[str, int] = {}
        for part in self.parts:
            if part.phase != BASELINE:
                totals[part.phase] = totals.get(part.phase, 0) + part.bytes
        return totals

    @property
    def baseline_bytes(self) -> int:
        return sum(p.bytes for p in self.parts if p.phase == BASELINE)

    @property
    def peak_phase(self) -> str | None:
        phases = self.phase_bytes()
        return max(phases, key=phases.__getitem__) if phases else None

    @property
    def peak_bytes(self) -> int:
        return self.baseline_bytes + max(self.phase_bytes().values(), default=0)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form ``--dry-run --json`` prints under ``memory``."""
        return {"peak_bytes": self.peak_bytes, "baseline_bytes": self.baseline_bytes,
                "peak_phase": self.peak_phase, "phases": self.phase_bytes(),
                "parts": [asdict(p) for p in self.parts], "notes": list(self.notes)}


# --- the baseline ---------------------------------------------------------------------------

def process_rss() -> int:
    """This process's resident memory now: Python, torch, deltafix and whatever the caller holds
    (a notebook's models count too: the run happens in this process)."""
    return psutil.Process().memory_info().rss


def calibration_stack_bytes(folder: Path) -> tuple[int, PreTrainedModel]:
    """RSS added by importing what calibration imports (transformers, accelerate, the modelling
    code of ``folder``'s architecture) and building its skeleton on the meta device: measured
    by doing it, since import costs depend on the installed versions. Zero when this process
    has done it already (its RSS then holds it). Returns the skeleton, for the model's shapes."""
    before = process_rss()
    from deltafix.calibration.capture import build_skeleton

    skeleton = build_skeleton(folder)
    return max(0, process_rss() - before), skeleton


# --- the streaming repair -----------------------------------------------------------------

def streaming_bytes(plan: Plan, n_inputs: int, pieces: bool = False) -> int:
    """Host memory the streaming loop needs: fp32 copies of the largest tensor per input + output,
    or, streamed in pieces, two output tensors (one being written while the next is computed) plus
    the workers' piece buffers and mapped windows (``piece_window_bytes``)."""
    if pieces:
        return 2 * max((t.nbytes for t in plan.tensors), default=0) + piece_window_bytes(plan, n_inputs)
    largest = max((t.nbytes // t.dtype.itemsize * FP32 for t in plan.tensors), default=0)
    return largest * (n_inputs + 2)


def piece_window_bytes(plan: Plan, n_inputs: int) -> int:
    """What the piece workers hold at once (``stream.PieceStream``): each worker an fp32 buffer of
    one piece per input, and the mapped window of every input of the job it runs, resident while
    it runs. A window is ``MAX_WINDOW_PIECES`` pieces, less when the largest tensor, shared among
    the workers, needs fewer (charging the full window said 400 MB for the toy testbed's 64 KB
    tensors). Mapped inputs count at the output dtype's width (F's, unless ``--dtype`` says
    otherwise)."""
    largest = max(plan.tensors, key=lambda t: t.nbytes, default=None)
    if largest is None:
        return 0
    workers, piece = stream.piece_workers(), stream.CPU_PIECE
    numel = largest.nbytes // largest.dtype.itemsize
    jobs = max(workers, -(-numel // (piece * stream.MAX_WINDOW_PIECES)))
    window = min(numel, -(-numel // (jobs * piece)) * piece)
    return workers * n_inputs * (piece * FP32 + window * largest.dtype.itemsize)


HESSIAN_WORK = 4
"""(in, in) fp32 matrices a Hessian method holds per weight with one H: H read from the cache, its
damped copy, the Cholesky factor and its inverse (Safe Delta's ``hessian_inverse_factor``); RegMean
holds H_s, H_u, the damped sum and its factor, the same count."""


def stream_hessian_bytes(plan: Plan) -> int:
    """The Hessian working set of the stream's widest decoder Linear (``HESSIAN_WORK`` of (in, in) fp32)."""
    widest = max((t.shape[-1] for t in plan.tensors if t.is_linear), default=0)
    return HESSIAN_WORK * widest * widest * FP32


def solved_weight_bytes(plan: Plan) -> int:
    """A sequential solve's weight read back from its staging folder for the stream: one fp32
    copy of the largest tensor beside the inputs."""
    return max((t.nbytes // t.dtype.itemsize * FP32 for t in plan.tensors), default=0)


# --- the model's shapes, from its skeleton ----------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What the calibration parts depend on, read from the meta skeleton (no weights loaded)."""

    params: int
    """Every parameter (a tied head counted once)."""
    outside_layers: int
    """Parameters of the base outside the decoder layers (embedding, final norm), which calibration
    materialises to record the layers' inputs."""
    layer: int
    """Parameters of the largest decoder layer."""
    layer_linears: int
    """Parameters of that layer's Linears (the weights a sequential solve writes per layer)."""
    hidden: int
    intermediate: int
    """Widest Linear input in a layer: what the MLP's activations are as wide as."""
    heads: int
    head_dim: int
    kv_width: int
    """Keys per token per layer (key heads × head dim), what generation caches twice."""
    n_layers: int
    vocab: int
    grams: int
    """Σ in² over one layer's Linears: the Grams capture holds per layer, one per Linear."""
    group_inputs: int
    """Σ in over one layer's groups of Linears that read one input (``input_groups``)."""


def input_groups(layer: nn.Module) -> list[list[tuple[str, int]]]:
    """A layer's Linears as groups that read one input tensor, from their names and widths alone.

    The rule of the supported architectures (Llama, Qwen2, Mistral): a parent module's Linears of
    one width read its input, except the parent's last Linear, which reads its combined result
    (q/k/v then o_proj; gate/up then down_proj). The sequential solve finds the real groups by
    running the layer; a dry run cannot run it without loading it.
    """
    from torch import nn

    by_parent: dict[str, list[tuple[str, int]]] = {}
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            by_parent.setdefault(name.rpartition(".")[0], []).append((name, module.in_features))
    groups: list[list[tuple[str, int]]] = []
    for linears in by_parent.values():
        *shared, last = linears
        for width in dict.fromkeys(w for _, w in shared):
            groups.append([(n, w) for n, w in shared if w == width])
        groups.append([last])
    return groups


def model_shape(skeleton: PreTrainedModel) -> ModelShape:
    """The shapes of ``skeleton`` (on the meta device) that the calibration parts need."""
    from torch import nn

    from deltafix.calibration.capture import decoder_layers

    prefix, layers = decoder_layers(skeleton)
    base = skeleton.get_submodule(prefix.rpartition(".")[0])
    layers_name = prefix.rpartition(".")[2]
    outside = sum(p.numel() for n, p in base.named_parameters() if not n.startswith(layers_name + "."))
    layer = max(layers, key=lambda m: sum(p.numel() for p in m.parameters()))
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    config = skeleton.config.get_text_config() if hasattr(skeleton.config, "get_text_config") else skeleton.config
    hidden = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 1))
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return ModelShape(
        params=sum(p.numel() for p in skeleton.parameters()), outside_layers=outside,
        layer=sum(p.numel() for p in layer.parameters()), layer_linears=sum(m.weight.numel() for m in linears),
        hidden=hidden, intermediate=max(m.in_features for m in linears), heads=heads, head_dim=head_dim,
        kv_width=int(getattr(config, "num_key_value_heads", None) or heads) * head_dim, n_layers=len(layers),
        vocab=int(skeleton.get_input_embeddings().weight.shape[0]),
        grams=sum(m.in_features ** 2 for m in linears),
        group_inputs=sum(group[0][1] for group in input_groups(layer)),
    )


# --- calibration data -----------------------------------------------------------------------

def batch_shapes(samples: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """(B, T) of each padded batch capture and the sequential solve run (``make_batches``)."""
    from deltafix.calibration.capture import DEFAULT_BATCH_SIZE, make_batches

    return [tuple(ids.shape) for ids, _ in make_batches(samples, DEFAULT_BATCH_SIZE)]  # type: ignore[misc]


def activation_bytes(batches: list[tuple[int, int]], shape: ModelShape) -> int:
    """One stream of activations: every batch's hidden states (B, T, hidden) fp32, kept between
    layers, plus the arguments recorded for the layers: the (B, 1, T, T) bool attention mask and
    the rotary cos/sin (T, head dim) fp32 of each batch."""
    return sum(b * t * shape.hidden * FP32 + b * t * t + 2 * t * shape.head_dim * FP32 for b, t in batches)


def layer_forward_bytes(batches: list[tuple[int, int]], shape: ModelShape) -> int:
    """The transient of one layer's forward on the largest batch: q, k, v and the attention output
    (B, T, hidden), the attention scores (B, heads, T, T) and the MLP's gate, up and product
    (B, T, intermediate), all fp32."""
    return max((b * t * (4 * shape.hidden + 3 * shape.intermediate + shape.heads * t) * FP32 for b, t in batches),
               default=0)


def tokens(batches: list[tuple[int, int]]) -> int:
    """Padded tokens of the batches (an upper bound of the real ones a solve keeps inputs of)."""
    return sum(b * t for b, t in batches)


# --- the phases -----------------------------------------------------------------------------

def checkpoint_bytes(folder: Path) -> int:
    """The weight files of ``folder``: transformers maps them while it loads a model, and their
    pages count in RSS beside the fp32 copy being built (measured on the real-model testbed: a
    0.26 GB bf16 checkpoint loads with a peak 0.27 GB above the loaded model)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def add_screen(estimate: MemoryEstimate, shape: ModelShape, user: list[tuple[int, int]], aligned: Path) -> None:
    """Screening the user's data (``calibration.screening``): A loaded whole in fp32 on CPU
    (``load_for_eval``) from its mapped checkpoint, generating a reply per request in batches of ``EVAL_BATCH_SIZE``; the key
    and value cache grows to the longest sample (the request alone is shorter: an upper bound)
    plus ``JUDGE_NEW_TOKENS``."""
    from deltafix.evaluation.evaluate import JUDGE_NEW_TOKENS
    from deltafix.options import EVAL_BATCH_SIZE

    longest = max((t for _, t in user), default=0) + JUDGE_NEW_TOKENS
    estimate.add("screen", "model", shape.params * FP32, "A loaded whole in fp32 to screen the user's data")
    estimate.add("screen", "checkpoint", checkpoint_bytes(aligned), "A's weight files, mapped while it loads")
    estimate.add("screen", "kv cache", shape.n_layers * 2 * EVAL_BATCH_SIZE * longest * shape.kv_width * FP32,
                 f"keys and values of {EVAL_BATCH_SIZE} replies at once, {longest} tokens each")
    estimate.add("screen", "logits", 2 * EVAL_BATCH_SIZE * shape.vocab * FP32,
                 "a step's fp32 logits and scores (generate keeps the last position's only)")


def add_capture(estimate: MemoryEstimate, shape: ModelShape, batches: list[tuple[int, int]], phase: str) -> None:
    """Capturing one set of Hessians (``capture_hessians`` into the cache): the activations of the
    calibration set, one decoder layer in fp32, its Grams twice (accumulated, then serialised into
    the cache file's bytes) and one batch's forward. The embedding is freed before the first layer
    and is smaller than a layer plus its Grams in the models deltafix supports."""
    estimate.add(phase, "activations", activation_bytes(batches, shape),
                 f"{tokens(batches)} padded tokens × hidden {shape.hidden} fp32, with masks")
    estimate.add(phase, "layer", shape.layer * FP32, "one decoder layer's weights in fp32")
    estimate.add(phase, "hessians", 2 * shape.grams * FP32,
                 "one layer's Grams (in×in fp32 per Linear) and their serialised copy for the cache")
    estimate.add(phase, "forward", layer_forward_bytes(batches, shape), "one batch through one layer")


def add_sequential(estimate: MemoryEstimate, shape: ModelShape, safety: list[tuple[int, int]],
                   user: list[tuple[int, int]]) -> None:
    """The sequential solve (``solve_sequentially``) at a decoder layer, its largest step: three
    models (A, F, R) each with its embedding and final norm and the current layer in fp32; four
    activation streams (A and R on the safety data, F and R on the user's); the targets' inputs of
    every group of Linears kept for the layer (``_run_capturing``); a group's four Grams (G, C per
    data set) and the solve's two (in, in) matrices (the damped Gram and its factor); the layer's
    solved weights twice (kept, then serialised to the staging folder); one batch's forward. The
    solved weights are staged on disk (about 4 bytes a parameter under $TMPDIR), not held."""
    phase = "sequential solve"
    both = safety + user
    estimate.add(phase, "models", 3 * (shape.outside_layers + shape.layer) * FP32,
                 "A, F and R: embedding, final norm and the current layer in fp32 each")
    estimate.add(phase, "activations", 2 * (activation_bytes(safety, shape) + activation_bytes(user, shape)),
                 f"four streams: A and R on {tokens(safety)} safety tokens, F and R on {tokens(user)} user tokens")
    estimate.add(phase, "target inputs", tokens(both) * shape.group_inputs * FP32,
                 "A's and F's inputs of each group of Linears of the layer, per real token")
    estimate.add(phase, "grams", 6 * shape.intermediate ** 2 * FP32,
                 "G and C per data set, the damped Gram and its factor (in×in fp32, widest input)")
    estimate.add(phase, "solved layer", 2 * shape.layer_linears * FP32,
                 "the layer's solved weights, kept and serialised to the staging folder")
    estimate.add(phase, "forward", layer_forward_bytes(both, shape), "one batch through one layer")
    estimate.notes.append(f"the sequential solve stages about {shape.params * FP32 / 1e6:,.0f} MB of solved weights "
                          "on disk under $TMPDIR, not in memory")


def add_stream(estimate: MemoryEstimate, plan: Plan, n_inputs: int, pieces: bool, calibrated: bool,
               sequential: bool) -> None:
    """The streaming repair: the existing per-tensor estimate plus what the method reads per weight
    (its Hessian working set, or the solved weight)."""
    phase = "repair stream"
    estimate.add(phase, "tensors", streaming_bytes(plan, n_inputs, pieces),
                 "piece buffers and two outputs" if pieces
                 else f"fp32 copies of the largest tensor: {n_inputs} inputs, the result and its output copy")
    if sequential:
        estimate.add(phase, "solved weight", solved_weight_bytes(plan), "the solved weight read back from staging")
    elif calibrated:
        estimate.add(phase, "hessians", stream_hessian_bytes(plan),
                     f"{HESSIAN_WORK} in×in fp32 matrices of the widest decoder Linear")


def add_tune(estimate: MemoryEstimate, plan: Plan, shape: ModelShape | None) -> None:
    """An ``auto`` knob or ``--front`` (``pipeline._tune``): a probe model loaded whole in fp32
    and, per probe, the repaired state dict it loads, beside the stream (or the sequential solve)
    that makes that dict. The phase is the largest of those plus the two."""
    heaviest = max((v for k, v in estimate.phase_bytes().items() if k in ("repair stream", "sequential solve")),
                   default=0)
    params = shape.params if shape is not None else sum(t.nbytes // t.dtype.itemsize for t in plan.tensors)
    estimate.add("tune", "probe model", params * FP32, "the model the probes generate with, fp32")
    estimate.add("tune", "repaired state", plan.total_bytes, "one probe's repaired tensors in the output dtype")
    estimate.add("tune", "repair", heaviest, "the stream or solve that makes each probe's tensors")


def estimate_memory(plan: Plan, n_inputs: int, pieces: bool, method: Method, params: MethodParams, *,
                    aligned: Path, finetuned: Path, safety_data: Path | None, safety_template: SafetyTemplate,
                    utility_data: Path | None, utility_samples: int | None, screen_utility: bool, no_cache: bool,
                    tune: bool, calibrates: bool) -> MemoryEstimate:
    """Every part of a repair's host memory (see the module doc).

    ``finetuned`` is F's folder (its tokenizer renders the user's data), ``tune`` whether the run
    auto-tunes or sweeps a front, ``calibrates`` whether it computes Hessians (a method that needs
    them, writing a full checkpoint). The calibration sets are rendered here, as the run will
    render them (utility unscreened: an upper bound), to know their batches' shapes.
    """
    estimate = MemoryEstimate()
    estimate.add(BASELINE, "process", process_rss(), "this process now (Python, torch, deltafix)")
    sequential = calibrates and method.sequential is not None and method.sequential.enabled(params)
    shape = None
    if calibrates or tune:
        stack, skeleton = calibration_stack_bytes(aligned)
        estimate.add(BASELINE, "calibration imports", stack,
                     "transformers, accelerate and the model's code, imported by the run" if stack
                     else "already imported by this process")
        shape = model_shape(skeleton)
    if calibrates:
        assert shape is not None
        try:
            safety, user = calibration_batches(aligned, finetuned, safety_data, safety_template, utility_data,
                                               utility_samples, method.needs_utility)
        except InputError as err:  # the run will refuse it; a dry run only plans and says so
            estimate.notes.append(f"calibration not counted: {err}")
            safety, user = [], []
        if method.needs_utility and screen_utility and user:
            add_screen(estimate, shape, user, aligned)
        if sequential:
            add_sequential(estimate, shape, safety, user)
        elif safety:
            add_capture(estimate, shape, safety, "calibrate safety")
            if user:
                add_capture(estimate, shape, user, "calibrate utility")
            if not no_cache:
                estimate.notes.append("calibration is counted as if the Hessian cache were cold; a warm cache "
                                      "skips it")
    add_stream(estimate, plan, n_inputs, pieces, calibrates, sequential)
    if tune:
        add_tune(estimate, plan, shape)
    return estimate


def calibration_batches(aligned: Path, finetuned: Path, safety_data: Path | None, safety_template: SafetyTemplate,
                        utility_data: Path | None, utility_samples: int | None, needs_utility: bool
                        ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The (B, T) batches of the safety set and of the user's set (empty when not used), rendered
    with the tokenizers the run uses (``engine.grams``)."""
    from deltafix.calibration.render import load_calibration
    from deltafix.engine.grams import _tokenizer

    safety = batch_shapes(load_calibration(safety_data, _tokenizer(aligned), template=safety_template).samples)
    user: list[tuple[int, int]] = []
    if needs_utility and utility_data is not None:
        user = batch_shapes(load_calibration(utility_data, _tokenizer(finetuned, aligned),
                                             max_samples=utility_samples).samples)
    return safety, user
