"""The Gram matrices a Hessian method needs, from the right model on the right data.

Safe Delta and RegMean use ``H_s``: inputs of the aligned model A on the safety data. RegMean
also uses ``H_u``: inputs of the fine-tune F on a sample of the user's own data. Both come from
the on-disk cache when A (or F) and the data are unchanged. A method solved sequentially
(``deltafix.engine.sequential``) gets the rendered data instead, since its Grams depend on its parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deltafix.calibration.templates import DEFAULT_SAFETY_TEMPLATE, SafetyTemplate
from deltafix.errors import InputError, OptionError
from deltafix.io.overlay import AdapterCheckpoint
from deltafix.io.reader import TensorIndex
from deltafix.methods import Method, MethodParams

if TYPE_CHECKING:  # imported at run time only where used: they pull in transformers
    from deltafix.calibration.render import CalibrationSet
    from deltafix.io.jsonl import Conversation
    from deltafix.calibration.cache import HessianStore
    from deltafix.engine.sequential import SolveFn, SolvedWeights


@dataclass
class SequentialInputs:
    """What a sequential solve needs besides the method: the models and the rendered data."""

    aligned: Path
    finetuned: Path
    finetuned_source: AdapterCheckpoint | None
    safety: CalibrationSet
    utility: CalibrationSet
    device: torch.device

    def solve(self, solve: SolveFn, keep: str) -> SolvedWeights:
        from deltafix.engine.sequential import solve_sequentially

        return solve_sequentially(self.aligned, self.finetuned, self.safety.samples, self.utility.samples, solve,
                                  keep=keep, finetuned_source=self.finetuned_source, device=self.device)


@dataclass
class Hessians:
    """``safety``: H of A on the safety data; ``utility``: H of F on the user's data (per weight name);
    ``sequential``: the inputs of a sequential solve instead of either."""

    safety: HessianStore | None = None
    utility: HessianStore | None = None
    sequential: SequentialInputs | None = None
    utility_set: CalibrationSet | None = None
    safety_template: SafetyTemplate = DEFAULT_SAFETY_TEMPLATE
    """The system prompts the safety set was shown under (its ``CalibrationSet.template``), for the report."""

    def close(self) -> None:
        for store in (self.safety, self.utility):
            if store is not None:
                store.close()

    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any]
        if self.sequential is not None:
            summary = {"sequential": True, "safety": {"samples": len(self.sequential.safety.samples)},
                       "utility": {"samples": len(self.sequential.utility.samples)}}
        else:
            summary = {role: {"key": store.key, "samples": store.n_samples, "from_cache": store.from_cache}
                       for role, store in (("safety", self.safety), ("utility", self.utility)) if store is not None}
        summary["safety"]["template"] = self.safety_template
        if self.utility_set is not None:
            summary["utility"].update(of=self.utility_set.available, screened_out_lines=list(self.utility_set.screened_out))
        return summary


def _tokenizer(*folders: Path):
    """The first folder's tokenizer that loads (an adapter folder often has none)."""
    from deltafix.calibration.render import load_tokenizer
    for folder in folders:
        if (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists():
            return load_tokenizer(folder)
    raise InputError(f"no tokenizer found in {', '.join(str(f) for f in folders)}; calibration needs one.")


def method_hessians(method: Method, params: MethodParams, aligned: Path, finetuned: Path,
                    finetuned_reader: TensorIndex, *, safety_data: Path | None,
                    safety_template: SafetyTemplate = DEFAULT_SAFETY_TEMPLATE,
                    utility_data: Path | None, device: torch.device, cache_dir: Path | None = None,
                    no_cache: bool = False, utility_samples: int | None = None,
                    screen_utility: bool = True) -> Hessians:
    """Capture (or load from the cache) what ``method`` with ``params`` needs; raise if its data is missing.

    ``utility_samples`` caps the conversations read from ``utility_data`` (evenly spaced);
    ``screen_utility`` leaves out those whose request A refuses (``deltafix.calibration.screening``);
    ``safety_template`` is the system prompts the safety set is shown under.
    """
    if not method.needs_hessian:
        return Hessians()
    # Imported here: transformers costs seconds to import, and methods without Hessians never need it.
    from deltafix.calibration.render import load_calibration
    from deltafix.calibration.cache import hessians_for

    if method.needs_utility and utility_data is None:
        raise OptionError(
            f"method {method.name} weighs safety against your task, so it needs a sample of the data F was "
            "fine-tuned on: pass --utility-data FILE (JSONL with prompt/response or messages)."
        )
    safety_set = load_calibration(safety_data, _tokenizer(aligned), template=safety_template)
    user_set = None
    if method.needs_utility:
        assert utility_data is not None  # refused above
        user_set = load_calibration(utility_data, _tokenizer(finetuned, aligned), max_samples=utility_samples,
                                    screen=refused_by_aligned(aligned, device) if screen_utility else None)
    # F as a model: its own folder, or A's with the adapter merged on the fly.
    adapter = finetuned_reader if isinstance(finetuned_reader, AdapterCheckpoint) else None
    finetuned_model = aligned if adapter is not None else finetuned
    if method.sequential is not None and method.sequential.enabled(params):
        assert user_set is not None
        return Hessians(sequential=SequentialInputs(aligned, finetuned_model, adapter, safety_set, user_set, device),
                        utility_set=user_set, safety_template=safety_set.template)
    hessians = Hessians(safety=hessians_for(aligned, safety_set, cache_dir=cache_dir, no_cache=no_cache,
                                            device=device), safety_template=safety_set.template)
    if user_set is not None:
        hessians.utility = hessians_for(finetuned_model, user_set, cache_dir=cache_dir, no_cache=no_cache,
                                        device=device, source=adapter)
        hessians.utility_set = user_set
    return hessians


def refused_by_aligned(aligned: Path, device: torch.device) -> Callable[[list[Conversation]], list[bool]]:
    """The screen for the user's data: per conversation, whether A refuses its request."""
    from deltafix.calibration.screening import refused_by, request_of

    return lambda conversations: refused_by(aligned, [request_of(c) for c in conversations], device)
