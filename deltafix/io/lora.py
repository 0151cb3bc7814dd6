"""PEFT LoRA adapters: read one as per-module factors and dense deltas; write one back.

A LoRA module holds ``A`` (r, in) and ``B`` (out, r) and adds ``scaling · B A`` to its base
weight, which is stored (out, in) for ``nn.Linear`` and (in, out) for GPT-2's ``Conv1D`` and for
embeddings (``fan_in_fan_out``). Every rule PEFT applies when it merges an adapter lives here,
in one place, and is tested against ``merge_and_unload``:

- scaling ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``; ``r`` and ``alpha`` per
  module from ``rank_pattern`` / ``alpha_pattern``, resolved by PEFT's own ``get_pattern_key``;
- ``lora_bias``: the base bias gains ``scaling · lora_B.bias``;
- DoRA: ``W' = m / ‖W + ΔW‖_row · (W + ΔW)``, which needs the base weight and is not low rank,
  so DoRA modules are flagged and never written back as plain LoRA factors;
- tensors saved whole (``modules_to_save``, ``bias="all"|"lora_only"``, saved embedding layers)
  are new full values of base tensors, not deltas; a module's delta applies on top of them.

Adapter keys such as ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` map to
base names such as ``model.layers.0.self_attn.q_proj.weight``; when a base checkpoint is given,
names that differ by one leading component (GPT-2 hub checkpoints store ``h.0…`` for the
model's ``transformer.h.0…``) are resolved against it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltafix.errors import InputError, MismatchError, OptionError, reason
from deltafix.io.reader import CheckpointReader, TensorInfo, read_safetensors_header

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# Adapter-key suffix -> (role, embedding-style key). Roles: A, B, bias (lora_bias), m (DoRA).
FACTOR_SUFFIXES: dict[str, tuple[str, bool]] = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_B.bias": ("bias", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
    ".lora_magnitude_vector": ("m", False),
    ".lora_magnitude_vector.weight": ("m", False),
}
# Init schemes that rewrite the base weights at load time: the adapter only makes sense on
# that rewritten base, which deltafix does not reconstruct.
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


@functools.cache
def unsupported_fields() -> tuple[str, ...]:
    """Config fields that change the forward/merge math beyond what this module implements.

    Read from the installed peft's own field metadata (imported here, not at module load: peft
    pulls in transformers, which would slow every ``deltafix`` command by seconds).
    """
    from peft import LoraConfig

    variants = tuple(
        f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant") and f.name != "use_dora"
    )
    return variants + ("use_qalora", "layer_replication", "target_parameters", "trainable_token_indices")


def is_adapter_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a PEFT ``adapter_config.json``."""
    return (Path(path) / CONFIG_NAME).is_file()


def lora_scaling(config: Mapping, path: str) -> tuple[int, float]:
    """``(r, scaling)`` PEFT gives the module at ``path`` (its name in the model, no prefix)."""
    from peft.utils.other import get_pattern_key

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), path), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), path), config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return int(r), scaling


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """Dense ``scaling · B A`` (fp32) in the base weight's layout: (out, in), or (in, out) if transposed."""
    delta = (B.float() @ A.float()) * scaling
    return delta.T if fan_in_fan_out else delta


def dora_delta(
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    magnitude: torch.Tensor,
    base_weight: torch.Tensor,
) -> torch.Tensor:
    """What PEFT's DoRA merge adds to ``base_weight``: ``m/‖W+ΔW‖_row ⊙ (W+ΔW) − W`` (fp32).

    Rows are output features: the norm runs over the input dimension in (out, in) layout.
    ``magnitude`` is (out,); the result has ``base_weight``'s layout.
    """
    weight = base_weight.float()
    weight = weight.T if fan_in_fan_out else weight
    merged = weight + (B.float() @ A.float()) * scaling
    factor = magnitude.float() / torch.linalg.norm(merged, dim=1)
    out = factor.view(-1, 1) * merged - weight
    return out.T if fan_in_fan_out else out


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: factors ``A`` (r, in), ``B`` (out, r) and how PEFT applies them.

    ``path`` is the module's name in the model the adapter was trained on (what PEFT's patterns
    match), ``prefix`` the key prefix in the adapter file. ``bias`` (out,) is ``lora_B.bias``
    (``lora_bias``); ``dora_magnitude`` (out,) marks a DoRA module. ``embedding`` modules use the
    ``lora_embedding_A/B`` keys and a (num_embeddings, dim) base, hence ``fan_in_fan_out``.
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool
    dora_magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    path: str = ""
    prefix: str = PEFT_PREFIX
    embedding: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def is_dora(self) -> bool:
        return self.dora_magnitude is not None

    @property
    def base_shape(self) -> tuple[int, int]:
        """Shape of the base weight this module adapts."""
        out_features, in_features = self.B.shape[0], self.A.shape[1]
        return (in_features, out_features) if self.fan_in_fan_out else (out_features, in_features)

    def delta(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Dense fp32 delta in the base layout; DoRA needs the weight it applies to."""
        if self.dora_magnitude is None:
            return lora_delta(self.A, self.B, self.scaling, self.fan_in_fan_out)
        if base_weight is None:
            raise ValueError(f"DoRA module {self.path} needs its base weight to compute a delta")
        return dora_delta(self.A, self.B, self.scaling, self.fan_in_fan_out, self.dora_magnitude, base_weight)

    def bias_delta(self) -> torch.Tensor | None:
        """What the base bias gains (fp32, (out,)), or None without ``lora_bias``."""
        return None if self.bias is None else self.bias.float() * self.scaling

    def keys(self) -> tuple[str, str]:
        """The adapter-file keys of ``A`` and ``B``."""
        if self.embedding:
            return f"{self.prefix}{self.path}.lora_embedding_A", f"{self.prefix}{self.path}.lora_embedding_B"
        return f"{self.prefix}{self.path}.lora_A.weight", f"{self.prefix}{self.path}.lora_B.weight"

    @property
    def bias_key(self) -> str:
        return f"{self.prefix}{self.path}.lora_B.bias"


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter folder, read into per-module factors keyed by base weight name.

    ``config`` is the raw ``adapter_config.json`` (unknown fields kept, so it round-trips).
    ``modules`` maps base weight names to ``LoraModule``; ``replaced`` maps base tensor names to
    the header entries (adapter key, shape, dtype) of their saved full values, read lazily with
    ``replacement``.
    """

    folder: Path
    config: dict
    modules: dict[str, LoraModule]
    replaced: dict[str, TensorInfo]
    weights_file: Path
    keep_alive: object = dataclasses.field(default=None, repr=False, compare=False)
    """The staging folder that holds ``weights_file`` when it was converted from a pickle."""

    @classmethod
    def load(cls, folder: str | Path, base: CheckpointReader | None = None,
             allow_pickle: bool = False) -> LoraAdapter:
        """Read ``folder``; with ``base``, resolve names against it and ``validate_against`` it.

        With ``allow_pickle``, an adapter saved only as ``adapter_model.bin`` is read by
        weights-only unpickling into a private safetensors copy (``io.pickled``)."""
        folder = Path(folder)
        config = read_adapter_config(folder)
        weights_file, keep_alive = folder / WEIGHTS_NAME, None
        if not weights_file.is_file():
            from deltafix.io.pickled import PICKLE_ADAPTER, convert_pickle_adapter

            if not (folder / PICKLE_ADAPTER).is_file():
                raise InputError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}; re-save the adapter.")
            if not allow_pickle:
                raise InputError(f"{folder} has only a pickle {PICKLE_ADAPTER}, which can run code when loaded; pass "
                                 "--allow-pickle to load its tensors only (weights-only unpickling, which never "
                                 "runs code from the file), or re-save the adapter with safetensors.")
            keep_alive, weights_file = convert_pickle_adapter(folder)
        headers, _ = read_safetensors_header(weights_file)
        base_names = set(base.names) if base is not None else None
        factors, replaced = _parse_keys(folder, headers, base_names)
        adapter = cls(folder, config, {}, replaced, weights_file, keep_alive)
        with safe_open(str(weights_file), framework="pt", device="cpu") as handle:
            for name, parts in factors.items():
                adapter.modules[name] = _build_module(folder, config, name, parts, handle, base)
        if base is not None:
            adapter.validate_against(base)
        return adapter

    @property
    def is_dora(self) -> bool:
        """True for DoRA adapters: their deltas are dense and must be merged, never re-factored."""
        return bool(self.config.get("use_dora"))

    def replacement(self, name: str) -> torch.Tensor:
        """The saved full value of base tensor ``name`` (stored dtype, CPU)."""
        with safe_open(str(self.weights_file), framework="pt", device="cpu") as handle:
            return handle.get_tensor(self.replaced[name].name)

    def replacement_tensors(self) -> dict[str, torch.Tensor]:
        """Every saved full tensor under its adapter key, for copying into a rewritten adapter."""
        return {info.name: self.replacement(name) for name, info in self.replaced.items()}

    def bias_modules(self) -> dict[str, LoraModule]:
        """Base bias names whose value the adapter shifts (``lora_bias``) -> their module."""
        return {_bias_name(name): m for name, m in self.modules.items() if m.bias is not None}

    @property
    def touched_names(self) -> set[str]:
        """Every base tensor name whose value the adapter changes."""
        return set(self.modules) | set(self.replaced) | set(self.bias_modules())

    def delta(self, name: str, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Dense fp32 delta of base weight ``name`` in its layout (DoRA needs ``base_weight``)."""
        return self.modules[name].delta(base_weight)

    def updated(self, name: str, base_tensor: torch.Tensor) -> torch.Tensor:
        """The value base tensor ``name`` has once the adapter is merged (fp32).

        A saved full value replaces the base tensor first; module and bias deltas apply on top of
        whatever the layer holds, exactly as PEFT loads and then merges.
        """
        value = (self.replacement(name) if name in self.replaced else base_tensor).float()
        if name in self.modules:
            value = value + self.modules[name].delta(value)
        bias_module = self.bias_modules().get(name)
        if bias_module is not None:
            value = value + bias_module.bias_delta()
        return value

    def validate_against(self, base: CheckpointReader) -> None:
        """Raise ``MismatchError`` unless every target exists in ``base`` with fitting shapes."""
        for name, module in self.modules.items():
            shape = self._layer_shape(base, name)
            if shape != module.base_shape:
                raise MismatchError(
                    f"adapter {self.folder} does not fit the base model: module {module.path} expects a weight "
                    f"of shape {module.base_shape} but the base has {shape}; use the base it was trained on."
                )
            if module.dora_magnitude is not None and module.dora_magnitude.shape != (module.B.shape[0],):
                raise InputError(f"adapter {self.folder}: the DoRA magnitude of {module.path} has the wrong shape.")
        for bias_name, module in self.bias_modules().items():
            if bias_name not in base and bias_name not in self.replaced:
                raise MismatchError(
                    f"adapter {self.folder} trains a bias for {module.path} (lora_bias) but the base layer has "
                    "no bias; use the base it was trained on."
                )
            if self._layer_shape(base, bias_name) != (module.B.shape[0],):
                raise MismatchError(
                    f"adapter {self.folder}: the lora_bias of {module.path} does not fit its base bias; "
                    "use the base it was trained on."
                )
        for name, info in self.replaced.items():
            if name not in base:
                raise MismatchError(
                    f"adapter {self.folder} saves {name}, which the base model does not have; "
                    "use the base it was trained on."
                )
            have, saved = base.info(name).shape, info.shape
            grown_vocab = len(saved) == len(have) >= 1 and saved[1:] == have[1:] and saved[0] > have[0]
            if saved != have and not grown_vocab:
                raise MismatchError(
                    f"adapter {self.folder} saves {name} with shape {saved} but the base has {have}; "
                    "use the base it was trained on."
                )

    def _layer_shape(self, base: CheckpointReader, name: str) -> tuple[int, ...]:
        """Shape the layer holds when the adapter applies: a saved full value wins over the base."""
        if name in self.replaced:
            return self.replaced[name].shape
        if name not in base:
            raise MismatchError(
                f"adapter {self.folder} targets {name}, which the base model does not have; "
                "use the base it was trained on."
            )
        return base.info(name).shape

    def write(self, folder: str | Path, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write this adapter with some modules' factors replaced (e.g. ``B ← M B``) into ``folder``."""
        new = {name: factors.get(name, (m.A, m.B)) for name, m in self.modules.items()}
        write_adapter(folder, self.config, new, modules=self.modules, extra_tensors=self.replacement_tensors())


def write_adapter(
    folder: str | Path,
    config: Mapping,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    modules: Mapping[str, LoraModule] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder``.

    ``factors`` maps base weight names to ``(A (r, in), B (out, r))``, written in their own dtype.
    Keys come from ``modules`` (the adapter the factors came from: its key names, embedding
    style and ``lora_B.bias`` are kept) or, for names it lacks, from PEFT's default naming.
    ``extra_tensors`` (adapter key -> tensor) are written as given (e.g. saved full tensors).
    Each module's rank must be the one ``config`` gives it, so that PEFT loads the result.
    DoRA configs are refused: a DoRA adapter's repaired form is a merged checkpoint.
    """
    if config.get("peft_type") != "LORA":
        raise ValueError("write_adapter writes LoRA adapters only (peft_type LORA)")
    if config.get("use_dora"):
        raise OptionError("a DoRA adapter cannot be written back as an adapter; write a merged checkpoint instead.")
    modules = modules or {}
    tensors: dict[str, torch.Tensor] = {}
    for name, (A, B) in factors.items():
        module = modules.get(name) or LoraModule(A, B, 1.0, False, path=_module_path(name))
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"{name}: factors of shapes {tuple(A.shape)}, {tuple(B.shape)} do not form B A")
        rank, _ = lora_scaling(config, module.path)
        if rank != A.shape[0]:
            raise ValueError(f"{name}: factors have rank {A.shape[0]} but the config gives {module.path} rank {rank}")
        key_a, key_b = module.keys()
        tensors[key_a] = A.contiguous()
        tensors[key_b] = B.contiguous()
        if module.bias is not None:
            tensors[module.bias_key] = module.bias.contiguous()
    for key, value in (extra_tensors or {}).items():
        tensors[key] = value.contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")


def unit_scaling_config(template: Mapping, ranks: Mapping[str, int]) -> dict:
    """A plain-LoRA config for exactly the modules in ``ranks`` (module path -> rank), scaling 1.

    ``lora_alpha = r`` everywhere (no rslora), the most common rank as ``r`` and the others in
    ``rank_pattern``/``alpha_pattern`` keyed by escaped full paths (PEFT anchors them at the
    end and at a dot, so each matches its own module only); ``target_modules`` lists the
    full paths so no other module is adapted. Other fields are kept from ``template``.
    """
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    default = max(sorted(counts), key=counts.__getitem__)
    others = {re.escape(path): rank for path, rank in sorted(ranks.items()) if rank != default}
    config = dict(template)
    config.update(
        peft_type="LORA",
        r=default,
        lora_alpha=default,
        rank_pattern=others,
        alpha_pattern=dict(others),
        use_rslora=False,
        use_dora=False,
        lora_bias=False,
        target_modules=sorted(ranks),
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
    )
    return config


def parse_adapter_config(folder: Path) -> dict:
    """``folder/adapter_config.json`` as a dict whose LoRA numbers are sane; ``InputError`` otherwise.

    Enough for loading the adapter with PEFT itself (evaluation); ``read_adapter_config`` adds what
    deltafix's own merge math needs.
    """
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; pass a PEFT adapter folder.")
    if not path.is_file():
        raise InputError(f"{folder} has no {CONFIG_NAME}; pass a PEFT adapter folder (saved with save_pretrained).")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"cannot read {path}: {reason(err)}; re-save the adapter with PEFT.") from err
    except RecursionError as err:
        raise InputError(f"{path} is nested too deeply to be an adapter config; re-save the adapter with PEFT.") from err
    if not isinstance(config, dict):
        raise InputError(f"{path} is not a JSON object; re-save the adapter with PEFT.")
    if config.get("peft_type") == "LORA":
        if "r" not in config or "lora_alpha" not in config:
            raise InputError(f"{path} lacks 'r' or 'lora_alpha'; re-save the adapter with PEFT.")
        _check_values(path, config)
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise InputError(f"{path}: base_model_name_or_path must be a model id or folder name, got {base!r}; "
                         "fix it or re-save the adapter with PEFT.")
    return config


def read_adapter_config(folder: Path) -> dict:
    """``folder/adapter_config.json`` as a dict, refused (``InputError``) unless deltafix can apply it exactly."""
    config = parse_adapter_config(folder)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InputError(f"{folder} is a PEFT {peft_type or 'unknown-type'} adapter; only LoRA adapters are supported.")
    for field in unsupported_fields():
        if config.get(field):
            raise InputError(
                f"{folder} uses the PEFT option {field!r}, which deltafix does not read; merge the adapter "
                "with PEFT (merge_and_unload) and pass the merged checkpoint instead."
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(BASE_REWRITING_INITS):
        raise InputError(
            f"{folder} was saved with init_lora_weights={init!r}, which rewrites the base weights; convert it "
            "to a plain LoRA adapter first (save_pretrained with path_initial_model_for_weight_conversion)."
        )
    return config


def _check_values(path: Path, config: Mapping) -> None:
    """Refuse values PEFT itself would reject: deltafix computes scalings from them directly, where a
    rank of 0 or a string alpha would surface as a division error instead of a message."""

    def fail(key: str, value: object, wanted: str) -> InputError:
        return InputError(f"{path}: {key} must be {wanted}, got {value!r}; fix it or re-save the adapter with PEFT.")

    def rank(key: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise fail(key, value, "a positive integer")

    def alpha(key: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(key, value, "a finite number")

    rank("r", config["r"])
    alpha("lora_alpha", config["lora_alpha"])
    for key, check in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        pattern = config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise fail(key, pattern, "an object mapping module names to values")
        for name, value in pattern.items():
            check(f"{key}[{name!r}]", value)
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise fail(key, config[key], "true or false")


def _parse_keys(
    folder: Path, headers: Mapping[str, TensorInfo], base_names: set[str] | None
) -> tuple[dict[str, dict[str, tuple[str, str, bool]]], dict[str, TensorInfo]]:
    """Sort adapter keys into module factors and saved full tensors, both under base names.

    Returns ``({base weight name: {role: (key, module path, embedding)}}, {base name: header})``.
    """
    resolve = _NameResolver(base_names)
    factors: dict[str, dict[str, tuple[str, str, bool]]] = {}
    replaced: dict[str, TensorInfo] = {}
    for key, info in headers.items():
        stripped = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in FACTOR_SUFFIXES if stripped.endswith(s)), None)
        if suffix is not None:
            role, embedding = FACTOR_SUFFIXES[suffix]
            path = stripped[: -len(suffix)]
            factors.setdefault(resolve(path + ".weight"), {})[role] = (key, path, embedding)
        elif any(part.startswith("lora_") for part in stripped.split(".")):
            raise InputError(f"{folder}: adapter tensor {key!r} is not a LoRA weight deltafix understands.")
        else:
            replaced[resolve(stripped.replace(".base_layer.", "."))] = info
    return factors, replaced


class _NameResolver:
    """Map a name in the adapter's model to the base checkpoint's name for the same tensor.

    Without a base, names are kept. With one: the same name, else the name without its first
    component (``transformer.h.0…`` -> ``h.0…``), else the one base name that is this name under
    one extra leading component. Names that match nothing are kept (validation reports them).
    """

    def __init__(self, base_names: set[str] | None) -> None:
        self.base_names = base_names
        self.by_tail: dict[str, list[str]] = {}
        for name in base_names or ():
            _, _, tail = name.partition(".")
            if tail:
                self.by_tail.setdefault(tail, []).append(name)

    def __call__(self, name: str) -> str:
        if self.base_names is None or name in self.base_names:
            return name
        tail = name.partition(".")[2]
        if tail in self.base_names:
            return tail
        candidates = self.by_tail.get(name, [])
        return candidates[0] if len(candidates) == 1 else name


def _build_module(
    folder: Path,
    config: Mapping,
    name: str,
    parts: Mapping[str, tuple[str, str, bool]],
    handle,
    base: CheckpointReader | None,
) -> LoraModule:
    """Read one module's tensors and fix its scaling and layout the way PEFT would."""
    if "A" not in parts or "B" not in parts:
        some_key = next(iter(parts.values()))[0]
        raise InputError(f"{folder}: {some_key!r} has no matching lora_A/lora_B partner; the adapter is incomplete.")
    key_a, path, embedding = parts["A"]
    A, B = handle.get_tensor(key_a), handle.get_tensor(parts["B"][0])
    if A.ndim != 2 or B.ndim != 2:
        raise InputError(f"{folder}: module {path} is not a linear or embedding LoRA (convolutions are not supported).")
    if A.shape[0] != B.shape[1]:
        raise InputError(f"{folder}: lora_A and lora_B of {path} have different ranks.")
    rank, scaling = lora_scaling(config, path)
    if rank != A.shape[0]:
        raise InputError(f"{folder}: {CONFIG_NAME} gives {path} rank {rank} but its weights have rank {A.shape[0]}.")
    magnitude = handle.get_tensor(parts["m"][0]) if "m" in parts else None
    if bool(config.get("use_dora")) != (magnitude is not None):
        raise InputError(f"{folder}: use_dora in {CONFIG_NAME} does not match the saved tensors of {path}.")
    fan_in_fan_out = embedding or bool(config.get("fan_in_fan_out"))
    if base is not None and not embedding and name in base:
        # PEFT picks the layout from the module type (Conv1D vs Linear), whatever the config says;
        # the base weight's shape tells the type apart unless it is square, where the config
        # decides (PEFT saves the flag it ended up using, so its own configs are right).
        out_features, in_features = B.shape[0], A.shape[1]
        shape = base.info(name).shape
        if out_features != in_features and shape in ((out_features, in_features), (in_features, out_features)):
            fan_in_fan_out = shape == (in_features, out_features)
    bias = handle.get_tensor(parts["bias"][0]) if "bias" in parts else None
    prefix = PEFT_PREFIX if key_a.startswith(PEFT_PREFIX) else ""
    return LoraModule(A, B, scaling, fan_in_fan_out, magnitude, bias, path, prefix, embedding)


def _bias_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight") + ".bias"


def _module_path(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")
