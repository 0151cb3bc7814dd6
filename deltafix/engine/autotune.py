"""``auto`` for a method's main knob: the value nearest the fine-tune that is still safe enough.

Every method's knob (Safe Delta's scale, RegMean's μ, RESTA's b, AsFT's λ, Safe LoRA's k) is
searched the same way (``TuneSpec``): each probe repairs the fine-tune in memory, loads the
result into one model held on the compute device, and measures the attack success rate on the
tune prompts; bisection over the knob's grid needs about log2(grid) + 2 probes. The tune prompts default to the
built-in ``harmful_tune.jsonl``, kept apart from the calibration prompts (the Hessians were built on
those, so a repair refuses them more easily than new ones: tuning on them overshoots) and from
the eval prompts (so the reported ASR stays held out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from deltafix.builtin_data import HARMFUL_TUNE
from deltafix.evaluation.evaluate import next_token_nll
from deltafix.io.jsonl import Record, conversation_of, read_prompt_records, string_field
from deltafix.methods import Method
from deltafix.methods.registry import AutoTuneParams
from deltafix.methods.search import largest_passing

AsrFn = Callable[[torch.nn.Module, list[str]], list[bool]]
"""Per prompt, whether the model answered instead of refusing (an attack success)."""


@dataclass(frozen=True)
class TuneSet:
    """Harmful prompts an ``auto`` knob is tuned on, with each one's category and style of asking
    (None when unlabelled)."""

    prompts: list[str]
    categories: list[str | None]
    styles: list[str | None]


def tune_prompts(path: str | Path | None) -> TuneSet:
    """Prompts of ``path`` (JSONL with "prompt" and optional "category" and "style", or plain lines),
    else the built-in tune set."""
    records = read_prompt_records(Path(path) if path else HARMFUL_TUNE, "tune prompt file")
    return TuneSet([_tune_prompt(record, where) for where, record in records],
                   [_label(record, "category") for _, record in records],
                   [_label(record, "style") for _, record in records])


def _label(record: Record, key: str) -> str | None:
    return str(record[key]) if record.get(key) else None


def _tune_prompt(record: Record, where: str) -> str:
    """A record's "prompt", or without one the content of its first message."""
    if "messages" in record and "prompt" not in record:
        return conversation_of(record, where)[0]["content"]
    return string_field(record, "prompt", where)


def category_gap(outcomes: list[list[bool]], categories: list[str | None], target: float) -> float | None:
    """Leave-one-category-out estimate of how much more often unseen topics are answered.

    ``outcomes`` holds the per-prompt attack successes of each probed value, safest value first.
    For each category c, the value is chosen as auto would choose it on the other categories, and
    the gap is c's attack success rate minus the others' at that value; the mean over categories
    estimates how far the tune ASR understates the ASR on topics the tune prompts do not cover.
    None with fewer than three categories.
    """
    groups = sorted({c for c in categories if c is not None})
    if len(groups) < 3:
        return None
    gaps = []
    for group in groups:
        held = [i for i, c in enumerate(categories) if c == group]
        rest = [i for i, c in enumerate(categories) if c != group]
        passing = [o for o in outcomes if _rate(o, rest) <= target]
        if passing:
            gaps.append(_rate(passing[-1], held) - _rate(passing[-1], rest))
    return sum(gaps) / len(gaps) if gaps else None


def _rate(outcome: list[bool], rows: list[int]) -> float:
    return sum(outcome[i] for i in rows) / len(rows)


def share(outcome: list[bool]) -> float:
    """The attack success rate of one probe's per-prompt outcomes."""
    return sum(outcome) / len(outcome)


def by_style(outcome: list[bool], styles: list[str | None]) -> dict[str, float]:
    """The attack success rate within each labelled style of asking."""
    return {style: _rate(outcome, [i for i, s in enumerate(styles) if s == style])
            for style in sorted({s for s in styles if s is not None})}


def answered(model: torch.nn.Module, state: dict[str, torch.Tensor], tune: TuneSet, asr_of: AsrFn) -> list[bool]:
    """Load one repaired state into the probe model and say, per tune prompt, whether it was answered."""
    load_state(model, state)
    return asr_of(model, tune.prompts)


def autotune(method: Method, params: AutoTuneParams, model: torch.nn.Module,
             repaired: Callable[[AutoTuneParams], dict[str, torch.Tensor]], tune: TuneSet,
             asr_of: AsrFn, echo: Callable[[str], None] = lambda _: None, aligned: list[bool] | None = None,
             known: dict[float, list[bool]] | None = None) -> tuple[AutoTuneParams, dict[str, Any]]:
    """Resolve ``auto`` to the grid value nearest the fine-tune whose repaired model has ASR ≤ ``target_asr``.

    ``repaired(params)`` returns the repaired state dict for concrete params; it is loaded into
    ``model`` (in place) for each probe. ``echo`` gets one line per probe (value, tune ASR,
    seconds). When even the safest value fails the target, the safest is used and the record
    says the target was missed.

    A value that just meets the target on the tune prompts answers more unseen harmful topics
    than tune ones. When the tune prompts carry categories, ``category_gap`` estimates that gap
    from the probes, and the value chosen is the nearest-F probed one whose tune ASR meets the
    target minus the gap; the record says how the target was met.

    A fine-tune's harm often lives in one style of asking: on the real testbed a RESTA b that met
    the target on average still answered half of the short "what's the quickest way to ..."
    requests, and so did the held-out prompts asked that way. When the tune prompts carry styles,
    a value passes only when each style meets its own target as well.

    ``aligned`` holds the aligned model's per-prompt outcomes (with ``target_from: aligned``): its
    ASR, overall and per style, is added to ``target_asr``. ``known`` holds outcomes already
    measured (by ``trade_off_front``, per grid value): those probes cost nothing.
    """
    assert method.tune is not None
    spec = method.tune
    baseline = share(aligned) if aligned is not None else 0.0
    target = min(1.0, params.target_asr + baseline)
    style_base = by_style(aligned, tune.styles) if aligned is not None else {}
    style_targets = {style: min(1.0, params.target_asr + style_base.get(style, 0.0))
                     for style in sorted({s for s in tune.styles if s is not None})}

    def worst_style(outcome: list[bool]) -> str | None:
        """The style furthest above its target, or None when every style meets it."""
        over = {style: asr - style_targets[style] for style, asr in by_style(outcome, tune.styles).items()
                if asr > style_targets[style]}
        return max(over, key=over.__getitem__) if over else None

    def meets(outcome: list[bool], margin: float = 0.0) -> bool:
        return share(outcome) <= target - margin and worst_style(outcome) is None
    seconds: list[float] = []
    outcomes: dict[float, list[bool]] = {}

    def probe(value: float) -> tuple[bool, float]:
        start = time.perf_counter()
        knob = _knob(spec.integer, value)
        if known is not None and value in known:
            outcomes[value] = known[value]
        else:
            outcomes[value] = answered(model, repaired(params.model_copy(update={spec.param: knob})), tune, asr_of)
        asr = share(outcomes[value])
        seconds.append(round(time.perf_counter() - start, 2))
        style = worst_style(outcomes[value])
        verdict = (f"misses {target:.3g}" if asr > target else
                   f"misses on {style} requests: {by_style(outcomes[value], tune.styles)[style]:.3f} > "
                   f"{style_targets[style]:.3g}" if style is not None else f"meets {target:.3g}")
        echo(f"auto {method.name} {spec.param}={knob:g}: tune ASR {asr:.3f} ({verdict}) in {seconds[-1]:.1f}s"
             + (" (from the front)" if known is not None and value in known else ""))
        return meets(outcomes[value]), asr

    grid = spec.grid()
    search = largest_passing(grid, probe)
    gap = category_gap([outcomes[v] for v in grid if v in outcomes], tune.categories, target)
    margin = max(0.0, round(gap or 0.0, 6))  # sums of thirds leave 1e-17 where the gap is 0
    value = search.value
    if margin > 0 and value is not None:
        safe = [v for v in grid if v in outcomes and meets(outcomes[v], margin)]
        value = safe[-1] if safe else None
    chosen = _knob(spec.integer, value if value is not None else grid[0])
    if value is None:
        how = f"missed: no probed value met the target{' minus the margin' if margin else ''}; the safest was used"
    elif margin:
        how = f"tune ASR <= target - margin ({target - margin:.3f}), margin = leave-one-category-out gap {margin:.3f}"
    else:
        unlabelled = all(c is None for c in tune.categories)
        how = "tune ASR <= target" + (" (tune prompts without categories: no margin)" if unlabelled else "")
    if style_targets and value is not None:
        how += ", in each style of asking"
    record = {
        "param": spec.param,
        "target_asr": target,
        "aligned_tune_asr": baseline if params.target_from == "aligned" else None,
        "style_targets": style_targets,
        "chosen": chosen,
        "met_target": value is not None,
        "how": how,
        "margin": margin,
        "n_prompts": len(tune.prompts),
        "probes": [{"value": v, "passed": ok, "asr": asr, "asr_by_style": by_style(outcomes[v], tune.styles),
                    "seconds": t}
                   for (v, ok, asr), t in zip(search.probes, seconds)],
    }
    echo(f"auto {method.name}: {spec.param}={chosen:g} ({how})")
    return params.model_copy(update={spec.param: chosen}), record


def trade_off_front(method: Method, params: AutoTuneParams, model: torch.nn.Module,
                    repaired: Callable[[AutoTuneParams], dict[str, torch.Tensor]], tune: TuneSet,
                    asr_of: AsrFn, loss_of: Callable[[torch.nn.Module], float],
                    echo: Callable[[str], None] = lambda _: None, points: int = 7,
                    outcomes: dict[float, list[bool]] | None = None) -> dict[str, Any]:
    """Sweep the knob over ``points`` values spread over its grid, safest first: tune ASR against a
    utility proxy that needs no labels, ``loss_of(model)`` (the fine-tuning loss on the user's data).

    The user reads the front to pick a value; ``echo`` gets one line per point. Each point's
    per-prompt outcomes go into ``outcomes`` (by grid value) for ``autotune`` to reuse.
    """
    assert method.tune is not None
    spec = method.tune
    grid = spec.grid()
    picks = sorted({round(i * (len(grid) - 1) / (points - 1)) for i in range(points)})
    rows = []
    for value in (grid[i] for i in picks):
        start = time.perf_counter()
        knob = _knob(spec.integer, value)
        outcome = answered(model, repaired(params.model_copy(update={spec.param: knob})), tune, asr_of)
        if outcomes is not None:
            outcomes[value] = outcome
        row = {"value": knob, "tune_asr": share(outcome), "user_loss": loss_of(model),
               "seconds": round(time.perf_counter() - start, 2)}
        rows.append(row)
        echo(f"front {method.name} {spec.param}={knob:g}: tune ASR {row['tune_asr']:.3f}, "
             f"user-data loss {row['user_loss']:.4f} ({row['seconds']:.1f}s)")
    return {"param": spec.param, "n_prompts": len(tune.prompts),
            "utility_proxy": "mean token NLL of the user's data (lower keeps more of the fine-tune)", "points": rows}


def mean_token_nll(model: torch.nn.Module, samples: list[torch.Tensor], batch_size: int = 16) -> float:
    """Mean next-token negative log-likelihood over every token of ``samples`` (1-D id tensors)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in batch], batch_first=True)
        nll, tokens = next_token_nll(model, ids.to(device), mask.to(device))
        total += nll
        count += tokens
    return total / max(count, 1)


def _knob(integer: bool, value: float) -> float | int:
    return int(value) if integer else value


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a repaired state dict into ``model`` in place (tied heads and buffers may be missing)."""
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"repaired tensors do not fit the model: {unexpected[:3]}")
