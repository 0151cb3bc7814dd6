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

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch

from deltafix.errors import InputError
from deltafix.methods import Method
from deltafix.methods.registry import AutoTuneParams
from deltafix.search import largest_passing

AsrFn = Callable[[torch.nn.Module, list[str]], float]


def default_tune_prompts() -> Path:
    return Path(str(resources.files("deltafix") / "data" / "harmful_tune.jsonl"))


def tune_prompts(path: str | Path | None) -> list[str]:
    """Prompts of ``path`` (JSONL with "prompt", or plain lines), else the built-in tune set."""
    source = Path(path) if path else default_tune_prompts()
    prompts: list[str] = []
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise InputError(f"cannot read tune prompts {source}: {err.strerror or err}.") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if source.suffix == ".jsonl":
            try:
                record = json.loads(line)
                prompt = record["prompt"] if "prompt" in record else record["messages"][0]["content"]
            except (ValueError, KeyError, IndexError, TypeError) as err:
                raise InputError(f"{source}:{number}: expected a JSON object with a prompt ({err}).") from err
            prompts.append(str(prompt))
        else:
            prompts.append(line.strip())
    if not prompts:
        raise InputError(f"{source} holds no prompts to tune on.")
    return prompts


def autotune(method: Method, params: AutoTuneParams, model: torch.nn.Module,
             repaired: Callable[[AutoTuneParams], dict[str, torch.Tensor]], prompts: list[str],
             asr_of: AsrFn, echo: Callable[[str], None] = lambda _: None) -> tuple[AutoTuneParams, dict[str, Any]]:
    """Resolve ``auto`` to the grid value nearest the fine-tune whose repaired model has ASR ≤ ``target_asr``.

    ``repaired(params)`` returns the repaired state dict for concrete params; it is loaded into
    ``model`` (in place) for each probe. ``echo`` gets one line per probe (value, tune ASR,
    seconds). When even the safest value fails the target, the safest is used and the record
    says the target was missed.
    """
    assert method.tune is not None
    spec = method.tune
    target = params.target_asr
    seconds: list[float] = []

    def probe(value: float) -> tuple[bool, float]:
        start = time.perf_counter()
        knob = int(value) if spec.integer else value
        state = repaired(params.model_copy(update={spec.param: knob}))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise RuntimeError(f"repaired tensors do not fit the model: {unexpected[:3]}")
        asr = asr_of(model, prompts)
        seconds.append(round(time.perf_counter() - start, 2))
        echo(f"auto {method.name} {spec.param}={knob:g}: tune ASR {asr:.3f} "
             f"({'meets' if asr <= target else 'misses'} {target}) in {seconds[-1]:.1f}s")
        return asr <= target, asr

    grid = spec.grid()
    search = largest_passing(grid, probe)
    chosen = search.value if search.value is not None else grid[0]
    if spec.integer:
        chosen = int(chosen)
    record = {
        "param": spec.param,
        "target_asr": target,
        "chosen": chosen,
        "met_target": search.value is not None,
        "n_prompts": len(prompts),
        "probes": [{"value": v, "passed": ok, "asr": asr, "seconds": t}
                   for (v, ok, asr), t in zip(search.probes, seconds)],
    }
    return params.model_copy(update={spec.param: chosen}), record
