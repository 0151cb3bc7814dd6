"""The method registry: a name -> ``Method`` table that the pipeline and the CLI read.

A method is a pure function over the tensors of one weight (plus, for Hessian methods, that
weight's input Gram matrices). Adding one is a new file under ``methods/`` that calls
``register``; nothing in the CLI or the pipeline changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from deltafix.errors import OptionError
from deltafix.methods.search import log_grid


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown keys are errors, values are validated.

    Numbers must be finite unless a field says otherwise (``allow_inf_nan=True``, e.g. AsFT's
    ``lam = inf``): a NaN or infinite budget or weight (``--set scale=nan``, ``1e400``) would
    otherwise turn every repaired weight into NaN/Inf.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class AutoTuneParams(MethodParams):
    """Parameters shared by methods whose budget accepts ``auto`` (see ``TuneSpec``)."""

    target_asr: float = Field(0.05, ge=0.0, le=1.0, description="ASR that an 'auto' budget must meet, "
                              "above the aligned model's own (see target_from).")
    target_from: Literal["aligned", "zero"] = Field(
        "aligned", description="aligned: the target is A's ASR on the tune prompts plus target_asr (a repair "
        "cannot refuse more than A did, and A rarely refuses every tune prompt); zero: target_asr itself.")
    tune_prompts: str | None = Field(
        None, description="harmful prompts for an 'auto' budget (file); None = the built-in tune set."
    )


@dataclass
class WeightTensors:
    """One weight as the methods see it: fp32 tensors on the compute device.

    ``aligned`` is W_A, ``finetuned`` W_F, ``unaligned`` W_P (None without ``--unaligned``).
    ``is_linear`` marks 2-D ``nn.Linear`` weights inside decoder layers, shape (out, in); the
    methods edit those and apply their ``other_params`` policy to everything else.
    ``hessian`` / ``utility_hessian`` load the (in, in) Gram of this Linear's inputs on the
    safety / user data on demand (Hessian methods only).
    """

    name: str
    aligned: torch.Tensor
    finetuned: torch.Tensor
    unaligned: torch.Tensor | None = None
    is_linear: bool = False
    hessian: Callable[[], torch.Tensor] | None = None
    utility_hessian: Callable[[], torch.Tensor] | None = None

    @property
    def delta(self) -> torch.Tensor:
        return self.finetuned - self.aligned


@dataclass
class ShiftedGrams:
    """The Grams one weight needs when it is solved on the partially repaired model R (``sequential``).

    With ``X_R`` R's inputs to the weight and ``X_A`` / ``X_F`` A's / F's own inputs (one row per
    token, ``2/N``-scaled like the Hessians): ``safety = X_Rᵀ X_R`` and ``safety_cross = X_Aᵀ X_R``
    on the safety data, ``utility = X_Rᵀ X_R`` and ``utility_cross = X_Fᵀ X_R`` on the user's
    data. All are (in, in), or 1-D diagonals for one-hot inputs (the token embedding).
    """

    safety: torch.Tensor
    safety_cross: torch.Tensor
    utility: torch.Tensor
    utility_cross: torch.Tensor


@dataclass
class Repaired:
    """A method's answer for one weight: the repaired tensor and numbers for the report."""

    tensor: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TuneSpec:
    """A parameter that accepts ``auto``, searched on a log grid from ``low`` to ``high``.

    ``safer`` says which end repairs more: ``lower`` for budgets (Safe Delta's scale, RegMean's
    μ: smaller keeps less of the fine-tune), ``higher`` for strengths (RESTA's b, AsFT's λ, Safe
    LoRA's k). ``auto`` picks the value nearest the fine-tune that still meets ``target_asr``.
    ``integer`` rounds the grid (module counts).
    """

    param: str
    low: float
    high: float
    per_decade: int = 3
    safer: Literal["lower", "higher"] = "lower"
    integer: bool = False

    def grid(self) -> list[float]:
        """Candidate values from the safest to the one that keeps most of the fine-tune."""
        values = log_grid(self.low, self.high, self.per_decade)
        if self.integer:
            values = sorted({float(round(v)) for v in values})
        return values if self.safer == "lower" else values[::-1]


class SolvedState(Protocol):
    """Weights solved ahead of the stream (by ``deltafix.engine.sequential``), looked up by name."""

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class SequentialSpec:
    """A method that can solve its weights in forward order on R's own inputs (``deltafix.engine.sequential``).

    ``enabled(params)`` says whether these parameters ask for it; ``solve(W_A, W_F, grams, params)``
    returns one weight's repaired (out, in) fp32 tensor; ``keep(params)`` ("finetuned" or "aligned")
    whose norms and biases the repaired model has meanwhile, as it will in the output. The solved
    weights reach ``repair`` as its ``state`` (a ``SolvedState``), so ``repair`` only looks them up.
    """

    enabled: Callable[[Any], bool]
    solve: Callable[[torch.Tensor, torch.Tensor, ShiftedGrams, Any], torch.Tensor]
    keep: Callable[[Any], str]


RepairFn = Callable[[WeightTensors, Any, Any], Repaired]
SurveyFn = Callable[[Iterable[WeightTensors], Any], Any]
LoraBFn = Callable[[WeightTensors, torch.Tensor, Any, Any], torch.Tensor]
FusedFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], tuple[float, float] | None]


@dataclass(frozen=True)
class Method:
    """A registered repair method.

    ``repair(weight, params, state)`` returns the repaired tensor. ``survey``, when given, sees
    every weight once before any repair (e.g. Safe LoRA ranks all modules by cosine) and its
    return value is passed to ``repair`` as ``state``. ``lora_b(weight, B, params, state)``,
    for methods whose edit is a left multiplication ``δ ← M δ``, maps a LoRA factor B (out, r)
    to ``M B`` so that a repaired adapter stays an adapter. ``elementwise(params)`` is True when,
    with these params, each output entry depends only on the same entry of the inputs and
    ``repair`` reports no stats: the pipeline may then stream any flat piece of a weight through
    ``repair`` (see ``deltafix.engine.stream``). ``fused(params)``, for such a method, may give a kernel
    doing the same in one pass over raw CPU inputs: ``kernel(F, A, P, out)`` on flat stretches in
    the checkpoints' dtype writes ``repair``'s result, rounded to ``out``'s dtype, into ``out`` and
    returns ``(‖F − A‖², ‖R − A‖²)``, or returns None when it cannot take those tensors and the
    stream goes through ``repair``. ``sequential``: see ``SequentialSpec``.
    """

    name: str
    summary: str
    params: type[MethodParams]
    repair: RepairFn
    survey: SurveyFn | None = None
    needs_unaligned: bool = False
    needs_hessian: bool = False
    needs_utility: bool = False
    lora_b: LoraBFn | None = None
    tune: TuneSpec | None = None
    elementwise: Callable[[Any], bool] | None = None
    fused: Callable[[Any], FusedFn | None] | None = None
    sequential: SequentialSpec | None = None

    @property
    def keeps_low_rank(self) -> bool:
        return self.lora_b is not None


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    load_builtin_methods()
    try:
        return _METHODS[name]
    except KeyError:
        raise OptionError(
            f"unknown method {name!r}; choose one of: {', '.join(sorted(_METHODS))}."
        ) from None


def method_names() -> list[str]:
    load_builtin_methods()
    return sorted(_METHODS)


def load_builtin_methods() -> None:
    """Import every module of this package once so that their ``register`` calls run."""
    import deltafix.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
