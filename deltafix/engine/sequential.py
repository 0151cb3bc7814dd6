"""Layer-sequential solve: every weight is repaired on the inputs the partially repaired model gives it.

Independent Hessians (``hessians.py``) see A's inputs on the safety data and F's on the user's
data, but the repaired model R sees neither: every weight before has already changed, and a
repair solved on stale inputs drifts further from its targets with each layer (on the testbed,
with its 25 % deltas, enough to lose the task). Here the weights are solved in the order the
forward pass uses them, each on R's own inputs ``X_R`` while its targets stay the outputs of A
on the safety data and of F on the user's data. One weight's objective is

    ‖W X_R^s − W_A X_A^s‖² + μ ‖W X_R^u − W_F X_F^u‖²,

which needs the Grams ``G = X_Rᵀ X_R`` and the cross Grams ``C = X_targetᵀ X_R`` of each data set
(``ShiftedGrams``); the method's ``solve`` turns them into the weight. The order is: the input
embedding (a Linear on one-hot tokens, so its Grams are diagonal token counts); then per decoder
layer, its Linears in groups that read the same input (q/k/v, o, gate/up, down in Llama), each
group's inputs recomputed after the groups before it were replaced; then the output head on the
final-norm hidden states, when it is a tensor of its own. Norms and biases come from A or F
(``keep``), as in the final checkpoint.

Four streams of activations run side by side, one decoder layer at a time as in ``hessians.py``:
A and R on the safety samples, F and R on the user samples. Solved weights go to a temporary
safetensors folder (``SolvedWeights``), one file per layer, so memory holds one layer. The
result depends on the method's parameters, so nothing is cached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from transformers import PreTrainedModel

from deltafix.env import bar
from deltafix.errors import OptionError, OutputError
from deltafix.calibration.capture import (
    DEFAULT_BATCH_SIZE,
    LayerBatch,
    StopForward,
    build_skeleton,
    decoder_layers,
    make_batches,
    materialise,
    record_layer_inputs,
    return_freed_memory,
    run_layer,
)
from deltafix.io.reader import CheckpointReader, TensorIndex
from deltafix.io.staging import StagingFolder
from deltafix.methods.registry import ShiftedGrams

SolveFn = Callable[[torch.Tensor, torch.Tensor, ShiftedGrams], torch.Tensor]


class SolvedWeights:
    """The solved weights (fp32, CPU) in a private staging folder under ``$TMPDIR``, one
    safetensors file per step: about 4 bytes a parameter, so the folder is named by its owner
    (``StagingFolder``) and a run killed outright has it removed by the next."""

    def __init__(self) -> None:
        self._dir = StagingFolder()
        self._files: dict[str, Path] = {}

    def add(self, step: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self._dir.path / f"{step}.safetensors"
        try:
            path.write_bytes(save({name: t.contiguous() for name, t in tensors.items()}))
        except OSError as err:
            raise OutputError(
                f"cannot stage solved weights in {self._dir.path} ({err.strerror or err}); "
                "point TMPDIR at a disk with about 4 bytes per model parameter free."
            ) from err
        self._files.update(dict.fromkeys(tensors, path))

    @property
    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self._files[name]), framework="pt", device="cpu") as fh:
            return fh.get_tensor(name)

    def close(self) -> None:
        self._dir.cleanup()


@dataclass
class _Model:
    """One role's skeleton, weight source and activation batches (per data set)."""

    model: PreTrainedModel
    source: TensorIndex
    prefix: str
    layers: nn.ModuleList
    batches: dict[str, list[LayerBatch]]

    @property
    def base(self) -> nn.Module:
        return self.model.get_submodule(self.prefix.rpartition(".")[0])


def _qualified_name(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None) if module is not None else None


def _tied(model: PreTrainedModel) -> bool:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def _token_counts(batches: list[tuple[torch.Tensor, torch.Tensor]], vocab: int, scale: float) -> torch.Tensor:
    """``(2/N) ×`` how often each token id occurs: the diagonal Gram of one-hot inputs."""
    counts = torch.zeros(vocab, dtype=torch.float32)
    for ids, mask in batches:
        counts += torch.bincount(ids[mask], minlength=vocab).float()
    return counts * scale


def _input_of(layer: nn.Module, batch: LayerBatch, index: int, linear: str) -> torch.Tensor:
    """The input (B, T, in) of ``linear`` when ``layer`` runs on ``batch``; the forward stops there."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0])
        raise StopForward

    handle = layer.get_submodule(linear).register_forward_pre_hook(hook)
    args, kwargs = batch.calls[index]
    try:
        layer(batch.hidden, *args, **kwargs)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not seen:
        raise OptionError(f"Linear {linear} does not run in the forward; sequential=false handles such models.")
    return seen[0]


def _linear_groups(layer: nn.Module, batch: LayerBatch, index: int) -> list[list[str]]:
    """The layer's Linears in forward order, grouped by the input tensor they share.

    The inputs are kept alive during the forward so that identity, not a reused id, decides.
    Linears that never run are left out (their weights follow ``keep``).
    """
    seen: list[tuple[str, torch.Tensor]] = []
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    handles = [m.register_forward_pre_hook(lambda _m, args, name=name: seen.append((name, args[0])))
               for name, m in linears.items()]
    args, kwargs = batch.calls[index]
    try:
        layer(batch.hidden, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in seen:
        group = next((names for tensor, names in groups if tensor is x), None)
        if group is None:
            groups.append((x, [name]))
        elif name not in group:
            group.append(name)
    return [names for _, names in groups]


def _run_capturing(layer: nn.Module, batches: list[LayerBatch], index: int, linears: list[str]
                   ) -> dict[str, list[torch.Tensor]]:
    """Run ``layer`` on every batch once (``batch.hidden`` becomes its output) and keep the real
    tokens' inputs (N, in) of each of ``linears``, per batch.

    A target model's weights never change, so one forward gives the inputs of all its groups;
    re-running it up to each group, as the repaired model must, would cost about twice as much.
    """
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    mask: list[torch.Tensor] = []
    handles = [layer.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: kept[name].append(args[0][mask[0]])) for name in linears]
    try:
        for batch in batches:
            mask[:] = [batch.mask]
            run_layer(layer, batch, index)
    finally:
        for handle in handles:
            handle.remove()
    return kept


def _cross_grams(inputs: Callable[[LayerBatch], torch.Tensor], targets: list[torch.Tensor],
                 r_batches: list[LayerBatch], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``G = (2/N) Σ x_R x_Rᵀ`` and ``C = (2/N) Σ x_T x_Rᵀ`` over the real tokens, fp32; ``targets``
    holds the target model's inputs of the real tokens per batch."""
    G = C = None
    for rb, x_t in zip(r_batches, targets):
        x_r = inputs(rb)[rb.mask].to(torch.float32)
        x_t = x_t.to(torch.float32)
        if G is None:
            G = torch.zeros(x_r.shape[-1], x_r.shape[-1], dtype=torch.float32, device=x_r.device)
            C = torch.zeros_like(G)
        G.addmm_(x_r.T, x_r)
        C.addmm_(x_t.T, x_r)
    assert G is not None and C is not None
    return G.mul_(scale), C.mul_(scale)


@torch.no_grad()
def solve_sequentially(
    aligned: str | Path,
    finetuned: str | Path,
    safety: Sequence[torch.Tensor],
    user: Sequence[torch.Tensor],
    solve: SolveFn,
    *,
    keep: str,
    finetuned_source: TensorIndex | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> SolvedWeights:
    """Solve the input embedding, every decoder-layer Linear and the output head in forward order.

    ``solve(W_A, W_F, grams)`` gets fp32 (out, in) weights on ``device`` (the embedding as
    its transpose, with 1-D diagonal Grams) and returns the repaired weight in that shape.
    ``finetuned`` is F's folder (its config); ``finetuned_source`` overrides where F's tensors
    come from (a LoRA adapter merged on the fly). ``keep`` says whose norms and biases R has.
    """
    if not safety or not user:
        raise OptionError("sequential solving needs both safety and user samples.")
    device = torch.device(device)
    a_reader = CheckpointReader(aligned)
    f_reader: TensorIndex = finetuned_source if finetuned_source is not None else CheckpointReader(finetuned)
    solved = SolvedWeights()
    try:
        _run(aligned, finetuned, a_reader, f_reader, {"safety": list(safety), "user": list(user)}, solve, keep,
             solved, device, dtype, batch_size)
    except BaseException:
        solved.close()
        raise
    finally:
        a_reader.close()
        if finetuned_source is None:
            f_reader.close()
    return solved


def _run(aligned: str | Path, finetuned: str | Path, a_reader: TensorIndex, f_reader: TensorIndex,
         data: dict[str, list[torch.Tensor]], solve: SolveFn, keep: str, solved: SolvedWeights,
         device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
    batched = {role: make_batches(samples, batch_size) for role, samples in data.items()}
    scale = {role: 2.0 / len(samples) for role, samples in data.items()}
    kept = a_reader if keep == "aligned" else f_reader  # R's norms and biases, as in the output
    roles = {"aligned": (aligned, a_reader), "finetuned": (finetuned, f_reader), "repaired": (finetuned, kept)}
    models: dict[str, _Model] = {}
    for role, (folder, source) in roles.items():
        model = build_skeleton(folder)
        prefix, layers = decoder_layers(model)
        models[role] = _Model(model, source, prefix, layers, {})
    A, F, R = models["aligned"], models["finetuned"], models["repaired"]
    if A.model.get_input_embeddings().weight.shape != F.model.get_input_embeddings().weight.shape:
        raise OptionError("sequential solving needs A and F to share one vocabulary; pass --set sequential=false.")
    targets = {"safety": "aligned", "user": "finetuned"}  # whose outputs R should reproduce on each data set

    embedding = _qualified_name(R.model, R.model.get_input_embeddings())
    assert embedding is not None
    layers_name = R.prefix.rpartition(".")[2]
    for m in models.values():
        materialise(m.base, m.prefix.rpartition(".")[0], m.source, device, dtype, skip=layers_name)
        m.source.close()

    name = f"{embedding}.weight"
    w_a, w_f = a_reader.get(name).to(device, torch.float32), f_reader.get(name).to(device, torch.float32)
    vocab = w_a.shape[0]
    counts = {role: _token_counts(batches, vocab, scale[role]).to(device) for role, batches in batched.items()}
    grams = ShiftedGrams(counts["safety"], counts["safety"], counts["user"], counts["user"])
    w_r = solve(w_a.T, w_f.T, grams).T.contiguous()
    solved.add("embedding", {name: w_r.cpu()})
    R.model.get_input_embeddings().weight.data = w_r.to(dtype)

    for m, role in ((A, "safety"), (F, "user"), (R, "safety"), (R, "user")):
        m.batches[role] = [record_layer_inputs(m.base, m.layers, i.to(device), k.to(device)) for i, k in batched[role]]

    for index in bar(range(len(R.layers)), desc="sequential solve", unit="layer"):
        layer = {role: m.layers[index] for role, m in models.items()}
        for role, m in models.items():
            materialise(layer[role], f"{m.prefix}.{index}", m.source, device, dtype)
            m.source.close()
        out: dict[str, torch.Tensor] = {}
        groups = _linear_groups(layer["repaired"], R.batches["safety"][0], index)
        target_inputs = {role: _run_capturing(layer[target], models[target].batches[role], index,
                                              [group[0] for group in groups])
                         for role, target in targets.items()}
        for group in groups:
            shifted = {
                role: _cross_grams(lambda b: _input_of(layer["repaired"], b, index, group[0]),
                                   target_inputs[role].pop(group[0]), R.batches[role], scale[role])
                for role in targets
            }
            grams = ShiftedGrams(shifted["safety"][0], shifted["safety"][1], shifted["user"][0], shifted["user"][1])
            for linear in group:
                name = f"{R.prefix}.{index}.{linear}.weight"
                w_r = solve(a_reader.get(name).to(device, torch.float32),
                            f_reader.get(name).to(device, torch.float32), grams)
                layer["repaired"].get_submodule(linear).weight.data = w_r.to(dtype)
                out[name] = w_r.cpu()
            a_reader.close()
            f_reader.close()
        solved.add(f"layer_{index:05d}", out)
        for batch in R.batches.values():  # the targets' batches ran in _run_capturing
            for b in batch:
                run_layer(R.layers[index], b, index)
        for m in models.values():
            m.layers[index].to("meta")
        return_freed_memory()

    _solve_head(models, targets, scale, a_reader, f_reader, solve, solved, device)


def _solve_head(models: dict[str, _Model], targets: dict[str, str], scale: dict[str, float],
                a_reader: TensorIndex, f_reader: TensorIndex, solve: SolveFn, solved: SolvedWeights,
                device: torch.device) -> None:
    """The output head on the final-norm hidden states, when it is a tensor of its own.

    A tied head is the embedding, solved already; a model without a ``norm`` after its layers
    is not one whose head inputs this module knows, and keeps its head as ``keep`` says.
    """
    R = models["repaired"]
    head = _qualified_name(R.model, R.model.get_output_embeddings())
    name = f"{head}.weight"
    if head is None or _tied(R.model) or name not in a_reader or name not in f_reader:
        return
    norms = {role: getattr(m.base, "norm", None) for role, m in models.items()}
    if any(not isinstance(norm, nn.Module) for norm in norms.values()):
        return

    def normed(role: str) -> Callable[[LayerBatch], torch.Tensor]:
        return lambda b: norms[role](b.hidden)

    shifted = {role: _cross_grams(normed("repaired"), [normed(target)(b)[b.mask] for b in models[target].batches[role]],
                                  R.batches[role], scale[role])
               for role, target in targets.items()}
    grams = ShiftedGrams(shifted["safety"][0], shifted["safety"][1], shifted["user"][0], shifted["user"][1])
    w_r = solve(a_reader.get(name).to(device, torch.float32), f_reader.get(name).to(device, torch.float32), grams)
    solved.add("head", {name: w_r.cpu()})
