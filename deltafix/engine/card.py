"""The model card (``OUT/README.md``): Hub metadata plus a readable account of the repair.

Everything on the card comes from the report dict a repair writes (``deltafix_report.json``), so
card and report cannot disagree; the one outside input is F's license, read from F's own card.
Metadata is built with ``ModelCardData`` (never by hand-written YAML); ``base_model`` lists Hub
ids only, so a repair of local folders names them in the text and leaves ``base_model`` out.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from huggingface_hub import ModelCard, ModelCardData, constants
from huggingface_hub.repocard import REGEX_YAML_BLOCK

CARD_NAME = "README.md"
TAGS = ["deltafix", "safety"]
LICENSE_KEYS = ("license", "license_name", "license_link")
ROLES = {"aligned": "aligned base (A)", "finetuned": "fine-tune (F)", "unaligned": "pre-alignment base (P)",
         "reinforce": "ReinforceLoRA (R)"}


def card_license(readme: Path) -> dict[str, str]:
    """``license`` (and ``license_name`` / ``license_link`` for custom ones) from a card's metadata.

    A missing file, a card without metadata or unreadable metadata gives ``{}``: the license is
    copied when the fine-tune states one, never guessed.
    """
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not REGEX_YAML_BLOCK.search(text):
        return {}
    try:
        data = ModelCard(text, ignore_metadata_errors=True).data
    except (yaml.YAMLError, ValueError):
        return {}
    return {key: str(getattr(data, key)) for key in LICENSE_KEYS if getattr(data, key, None)}


def card_metadata(report: Mapping[str, Any], *, adapter: bool = False,
                  license_fields: Mapping[str, str] | None = None) -> ModelCardData:
    """Hub metadata: an adapter derives from A alone; a full checkpoint is a merge of A and F."""
    inputs = report["inputs"]
    roles = ("aligned",) if adapter else ("aligned", "finetuned")
    hub_ids = [inputs[r]["repo_id"] for r in roles if inputs.get(r, {}).get("repo_id")]
    extra: dict[str, Any] = {}
    if hub_ids:
        extra["base_model_relation"] = "adapter" if adapter else "merge"
    return ModelCardData(
        base_model=(hub_ids[0] if len(hub_ids) == 1 else hub_ids) or None,
        library_name="peft" if adapter else "transformers",
        tags=list(TAGS),
        **dict(license_fields or {}),
        **extra,
    )


def model_card(report: Mapping[str, Any], *, adapter: bool = False,
               license_fields: Mapping[str, str] | None = None) -> ModelCard:
    """The whole card for one repair report (with its ``gate`` entry when a gate ran)."""
    data = card_metadata(report, adapter=adapter, license_fields=license_fields)
    body = "\n\n".join(
        part for part in (
            _summary(report, adapter), _custom_code(report), _inputs(report), _method(report), _tuning(report),
            _result(report),
            _gate(report), _notes(report), _reproduce(report),
        ) if part
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def write_model_card(folder: Path, report: Mapping[str, Any], *, license_from: Path | None = None) -> Path:
    """Write ``folder/README.md``; the output is an adapter when the folder holds ``adapter_config.json``."""
    fields = card_license(license_from) if license_from is not None else {}
    card = model_card(report, adapter=(folder / "adapter_config.json").is_file(), license_fields=fields)
    path = folder / CARD_NAME
    card.save(path)
    return path


_EMBEDDED_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])~?/[^\s'\"`,;()]+")


def local_name(path: str) -> str:
    """A local path as the last component of what it points to (``.`` -> the current folder's name)."""
    return Path(path).expanduser().resolve().name or path


def _public_token(token: str) -> str:
    """One command-line word as published: a local path becomes its last component, in ``--opt=PATH``
    and ``key=PATH`` forms too; Hub ids (``org/name@rev``), which exist on no local disk, stay."""
    key, sep, value = token.partition("=")
    if sep and not key.startswith(("/", "~", ".")):
        return f"{key}={_public_token(value)}" if value else token
    if token.startswith("~") or os.path.isabs(token) or (os.sep in token and Path(token).exists()):
        return local_name(token)
    return token


def public_command(command: str) -> str:
    """``command`` with every local path shortened to its last component (see ``_public_token``)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return _EMBEDDED_ABSOLUTE_PATH.sub(lambda m: local_name(m.group()), command)
    return shlex.join(_public_token(word) for word in words)


def public_copy(value: Any) -> Any:
    """A deep copy of ``value`` (JSON-like) whose strings carry no absolute local path: a whole-string
    path becomes its last component, as does a path inside a sentence."""
    if isinstance(value, Mapping):
        return {key: public_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [public_copy(item) for item in value]
    if isinstance(value, str):
        return _EMBEDDED_ABSOLUTE_PATH.sub(lambda m: local_name(m.group()), _public_token(value))
    return value


def public_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report as uploaded to the Hub: nothing of the author's disk (cache, home, output folders).

    Hub inputs keep their id and revision; local inputs are named by their folder's last component;
    the command line and every other string lose local paths the same way. Hashes, numbers and
    module names are unchanged, so the published report still identifies the exact inputs.
    """
    public = public_copy({key: value for key, value in report.items() if key not in ("inputs", "command")})
    if "command" in report:
        public["command"] = public_command(report["command"]) if report["command"] else report["command"]
    public["inputs"] = {
        role: {**record, "ref": record["ref"] if record.get("repo_id") else local_name(record["ref"])}
        for role, record in report.get("inputs", {}).items()
    }
    return {key: public[key] for key in report}


def _display(record: Mapping[str, Any]) -> str:
    """A Hub id as a link; a local folder as its plain name (no paths from the author's disk)."""
    if record.get("repo_id"):
        return f"[{record['repo_id']}]({constants.ENDPOINT}/{record['repo_id']})"
    return f"`{Path(record['ref']).name or record['ref']}`"


def _revision(record: Mapping[str, Any]) -> str:
    sha = record.get("revision")
    if record.get("repo_id") and sha:
        return f"[`{sha[:12]}`]({constants.ENDPOINT}/{record['repo_id']}/tree/{sha})"
    return "local folder"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in table.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _summary(report: Mapping[str, Any], adapter: bool) -> str:
    inputs = report["inputs"]
    title = inputs["finetuned"].get("repo_id") or Path(inputs["finetuned"]["ref"]).name
    kind = "an adapter" if adapter else "a full checkpoint"
    return (
        f"# {title} (safety-repaired)\n\n"
        f"The fine-tune {_display(inputs['finetuned'])} with the safety behaviour of its aligned base "
        f"{_display(inputs['aligned'])} restored by deltafix {report['deltafix_version']} with the "
        f"`{report['method']}` method, edited from the weights alone and written as {kind} that loads "
        "exactly like the fine-tune."
    )


def _custom_code(report: Mapping[str, Any]) -> str:
    """How to load an output whose config has an ``auto_map``: transformers runs the model's own code
    only with ``trust_remote_code=True``, which the reader should pass after reading that code.
    deltafix copied it unread and unrun, so the card cannot vouch for it."""
    code = (report.get("output") or {}).get("custom_code")
    if not code:
        return ""
    files = ", ".join(f"`{name}`" for name in code["files"]) or "the code it names"
    text = (f"## Custom code\n\nThis model uses custom code (`auto_map`): load it with `trust_remote_code=True` "
            f"after reviewing {files}.")
    if code["other_repos"]:
        text += (" Its `auto_map` also names code in other repositories, which transformers downloads when "
                 "loading: " + ", ".join(f"`{repo}`" for repo in code["other_repos"]) + ".")
    if code["missing"]:
        text += (" These modules it names were not in the input folder, so loading needs them added: "
                 + ", ".join(f"`{name}`" for name in code["missing"]) + ".")
    return text


def _role(role: str, record: Mapping[str, Any]) -> str:
    if role == "unaligned" and record.get("kind") == "harmful-finetune":
        return "unaligned model (P): A fine-tuned on harmful data"
    return ROLES[role]


def _inputs(report: Mapping[str, Any]) -> str:
    rows = [(_role(role, record), _display(record), _revision(record))
            for role, record in report["inputs"].items() if role in ROLES]
    return "## Inputs\n\n" + _table(("role", "model", "revision"), rows)


def _method(report: Mapping[str, Any]) -> str:
    params = report.get("parameters") or {}
    text = f"## Method\n\n`{report['method']}`"
    if params:
        text += " with these parameters:\n\n" + _table(("parameter", "value"), sorted(params.items()))
    return text


def _tuning(report: Mapping[str, Any]) -> str:
    """How an ``auto`` knob was chosen and, with ``--front``, the trade-off it was chosen from."""
    parts = []
    tune = report.get("autotune")
    if tune:
        met = "met" if tune["met_target"] else "**missed** (the safest value was used)"
        parts.append(f"`{tune['param']}` was chosen automatically: {tune['chosen']:g}, the value nearest the "
                     f"fine-tune whose attack success rate on {tune['n_prompts']} tune prompts {met} the "
                     f"target {tune['target_asr']}.\n\n"
                     + _table((tune["param"], "tune ASR", "seconds"),
                              ((p["value"], p["asr"], p["seconds"]) for p in tune["probes"])))
    front = report.get("front")
    if front:
        parts.append(f"Trade-off front over `{front['param']}` (chosen: {front['chosen']}); utility proxy: "
                     f"{front['utility_proxy']}.\n\n"
                     + _table((front["param"], "tune ASR", "user-data loss"),
                              ((p["value"], p["tune_asr"], p["user_loss"]) for p in front["points"])))
    return "## Tuning\n\n" + "\n\n".join(parts) if parts else ""


def _result(report: Mapping[str, Any]) -> str:
    totals = report.get("totals") or {}
    if not totals:
        return ""
    rows = [
        ("tensors written", totals["tensors"]),
        ("decoder Linear weights edited", totals["linear_modules"]),
        ("fine-tuning delta norm before", totals["delta_norm_before"]),
        ("delta norm after repair", totals["delta_norm_after"]),
    ]
    return "## Result\n\n" + _table(("quantity", "value"), rows)


def _gate(report: Mapping[str, Any]) -> str:
    gate = report.get("gate")
    if not gate:
        return ""
    verdict = "passed" if gate["passed"] else "**failed**"
    return f"## Safety gate\n\nThe gate {verdict}.\n\n" + _table(("metric", "value"), _flatten(gate["table"]))


def _notes(report: Mapping[str, Any]) -> str:
    notes = report.get("notes") or []
    return "## Notes\n\n" + "\n".join(f"- {n}" for n in notes) if notes else ""


def _reproduce(report: Mapping[str, Any]) -> str:
    text = "## Reproduce\n\n"
    if report.get("command"):
        text += f"```\n{report['command']}\n```\n\n"
    return text + (
        "The effective recipe is in `deltafix_recipe.yaml`; `deltafix_report.json` records the input "
        "files' sha256, per-module statistics, timings and peak memory."
    )
