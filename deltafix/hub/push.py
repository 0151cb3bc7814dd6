"""``deltafix hub``: resolve -> pre-flight -> repair -> gate -> upload, as one library call.

Everything that talks to the Hub for writing or for headers goes through a small ``HubClient``
(the real ``HfApi`` by default), so the pipeline runs unchanged against a recording stand-in.
Downloads go through ``snapshot_download`` inside the repair (``deltafix.io.refs``). The token
is never handled here: ``HfApi`` reads ``HF_TOKEN`` or the saved login itself.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import yaml

from deltafix import __version__
from deltafix.engine.card import CARD_NAME, public_copy, public_report, write_model_card
from deltafix.errors import OptionError, OutputError
from deltafix.evaluation.judges import JudgeSpec
from deltafix.options import DEFAULT_MIN_BENIGN_HELP, DEVICE, EVAL_MAX_NEW_TOKENS
from deltafix.io.refs import HUB_ID, hub_offline
from deltafix.env import cache_root
from deltafix.hub.preflight import HeaderSource, Preflight, preflight
from deltafix.engine.pipeline import RepairOptions, run_repair
from deltafix.engine.report import RECIPE_NAME, REPORT_NAME

GateFn = Callable[[Path], tuple[bool, dict[str, Any]]]
"""Judges a published output folder: ``(passed, table)``, the table being what the card shows."""

DELETE_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.bin",
]
"""Weights already in the target repo that the push replaces: stale shards of another layout (or
pickle weights of the unrepaired model) must not survive next to the repaired ones. Files the
push uploads under the same name are kept, as ``upload_folder`` applies deletions first."""


class HubClient(HeaderSource, Protocol):
    """The ``HfApi`` methods the pipeline uses (headers for the pre-flight, then the push)."""

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False) -> Any: ...

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, commit_message: str | None = None,
                      commit_description: str | None = None, create_pr: bool | None = None,
                      delete_patterns: list[str] | None = None) -> Any: ...


@dataclass
class PushOptions:
    """Where and how the repaired folder goes (``--push --private --create-pr --force --dry-run``)."""

    repo_id: str
    private: bool = False
    create_pr: bool = False
    force: bool = False
    dry_run: bool = False


@dataclass
class Upload:
    """The commit the pipeline makes (or, with ``--dry-run``, would make)."""

    repo_id: str
    folder: Path
    files: list[str]
    delete_patterns: list[str]
    commit_message: str
    commit_description: str
    private: bool
    create_pr: bool


@dataclass
class HubResult:
    out: Path
    report: dict[str, Any]
    preflight: Preflight | None
    upload: Upload
    gate_passed: bool | None = None
    uploaded: bool = False
    commit_url: str | None = None
    messages: list[str] = field(default_factory=list)


def default_out(repo_id: str) -> Path:
    """``<deltafix cache>/hub/<org>--<name>``: kept after the run for inspection, reused by the next."""
    return cache_root() / "hub" / repo_id.replace("/", "--")


def default_client() -> HubClient:
    from huggingface_hub import HfApi

    return HfApi()


def cli_gate(max_asr: float, *, min_benign_help: float | None = None, max_utility_drop: float | None = None,
             harmful: Path | None = None, benign: Path | None = None, utility: Path | None = None,
             answers: Path | None = None, reference: tuple[str, str] | None = None, device: str = DEVICE,
             judge: JudgeSpec | None = None, max_new_tokens: int = EVAL_MAX_NEW_TOKENS) -> GateFn:
    """The gate behind ``deltafix hub --gate``, with the thresholds of ``deltafix gate``.

    OUT passes when its attack success rate is at most ``max_asr`` and it answers at least
    ``min_benign_help`` (default ``DEFAULT_MIN_BENIGN_HELP``) of the benign prompts, so a model that
    refuses everything is not pushed; with ``utility`` data it must also stay within
    ``max_utility_drop`` of ``reference`` (the fine-tune F and its base A, as refs), so a repair
    that erased the fine-tune is not pushed either. ``answers`` receives every prompt, response and
    verdict as JSONL. ``judge`` (default: keywords) decides refusals on ``max_new_tokens`` generated
    tokens, as in ``deltafix gate``; a classifier is loaded after the repair, once. Thresholds are
    checked here, before the repair runs; the table is the gate report (every number and threshold).
    """
    from deltafix.evaluation.evaluate import check_answers_path
    from deltafix.evaluation.gate import check_thresholds

    min_benign_help = DEFAULT_MIN_BENIGN_HELP if min_benign_help is None else min_benign_help
    if max_utility_drop is not None and utility is None:
        raise OptionError("--max-utility-drop compares task scores with the fine-tune: pass --utility FILE too.")
    compare = utility is not None and reference is not None
    check_thresholds(max_asr=max_asr, min_benign_help=min_benign_help, max_utility_drop=max_utility_drop,
                     has_reference=compare)
    if answers is not None:
        check_answers_path(answers)

    def run(folder: Path) -> tuple[bool, dict[str, Any]]:
        from deltafix.evaluation.evaluate import evaluate_folder, write_answers
        from deltafix.evaluation.gate import gate
        from deltafix.io.refs import resolve_ref

        from deltafix.evaluation.judges import load_judges

        judges = load_judges(judge or JudgeSpec(), device)
        scoring = dict(judge=judges.harmful, benign_judge=judges.benign, max_new_tokens=max_new_tokens,
                       device=device, progress=False)
        base_folder = resolve_ref(reference[1]).folder if reference is not None else None
        result = evaluate_folder(folder, base=base_folder, harmful=harmful, benign=benign, utility=utility, **scoring)
        ref = None
        if compare:
            ref = evaluate_folder(resolve_ref(reference[0]).folder, base=base_folder, harmful=[], benign=[],
                                  utility=utility, **scoring)
        if answers is not None:
            write_answers(answers, {"model": result, **({"reference": ref} if ref is not None else {})})
        verdict = gate(result, max_asr=max_asr, min_benign_help=min_benign_help, reference=ref,
                       max_utility_drop=max_utility_drop)
        return verdict.passed, {c.name: {"value": c.value, "threshold": f"{c.op} {c.threshold}"}
                                for c in verdict.checks}

    return run


def run_hub(opts: RepairOptions, push: PushOptions, *, gate_fn: GateFn | None = None,
            client: HubClient | None = None, echo: Callable[[str], None] = lambda _: None) -> HubResult:
    """Repair ``opts.finetuned`` against ``opts.base`` into ``opts.out`` and push it to ``push.repo_id``.

    Order matters for cost: the pre-flight reads headers only, so a wrong pair of models fails
    before any weight is downloaded; the gate runs on the published folder, and a failing gate
    keeps it off the Hub unless ``push.force``. ``opts.dry_run`` is ignored (a plan-only repair has
    nothing to push); ``push.dry_run`` does everything except the Hub writes.
    """
    if not HUB_ID.match(push.repo_id) or "@" in push.repo_id:
        raise OptionError(f"--push {push.repo_id!r} must be a Hub repo id like org/name.")
    client = client if client is not None else default_client()
    messages: list[str] = []

    def say(line: str) -> None:
        messages.append(line)
        echo(line)

    checked = None
    if hub_offline():
        say("offline (HF_HUB_OFFLINE=1): skipped the remote pre-flight; inputs come from the local Hub cache.")
    else:
        checked = preflight(client, opts.base, opts.finetuned, opts.unaligned, opts.allow_pickle)
        if checked is not None:
            say(checked.summary())

    result = run_repair(dataclasses.replace(opts, dry_run=False))
    report = result.report
    gate_passed = None
    if gate_fn is not None:
        gate_passed, table = gate_fn(opts.out)
        report["gate"] = {"passed": gate_passed, "table": table}
    report = publishable(opts.out, report)

    upload = plan_upload(opts.out, report, push)
    outcome = HubResult(opts.out, report, checked, upload, gate_passed, messages=messages)
    if gate_passed is False and not push.force:
        return outcome
    if push.dry_run:
        return outcome
    outcome.commit_url = _push(client, upload)
    outcome.uploaded = True
    return outcome


def publishable(folder: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the report, recipe and card in ``folder`` as they are uploaded: without local paths.

    The repair wrote them for the author's disk (the command line with its folders, local input
    paths); a public repo names Hub inputs by id and revision and local folders by their last
    component only (``card.public_report``). Returns the public report.
    """
    public = public_report(report)
    (folder / REPORT_NAME).write_text(json.dumps(public, indent=2) + "\n")
    recipe = folder / RECIPE_NAME
    if recipe.is_file():
        recipe.write_text(yaml.safe_dump(public_copy(yaml.safe_load(recipe.read_text())), sort_keys=False))
    write_model_card(folder, public, license_from=folder / CARD_NAME)
    return public


def plan_upload(folder: Path, report: dict[str, Any], push: PushOptions) -> Upload:
    """The files, deletions and commit text for pushing ``folder``; the message names deltafix and the method."""
    inputs = report["inputs"]
    finetuned = inputs["finetuned"].get("repo_id") or Path(inputs["finetuned"]["ref"]).name
    message = f"deltafix {__version__}: {report['method']} safety repair of {finetuned}"
    lines = [
        f"{role}: {rec.get('repo_id') or Path(rec['ref']).name}"
        + (f" @ {rec['revision']}" if rec.get("revision") else " (local)")
        for role, rec in inputs.items()
    ]
    if "gate" in report:
        failed = "failed, pushed with --force" if push.force else "failed"
        lines.append(f"gate: {'passed' if report['gate']['passed'] else failed}")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return Upload(push.repo_id, folder, files, list(DELETE_PATTERNS), message, "\n".join(lines),
                  push.private, push.create_pr)


def _push(client: HubClient, upload: Upload) -> str | None:
    """Create the repo if needed and commit the folder; Hub refusals become one-line errors."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        client.create_repo(upload.repo_id, private=True if upload.private else None, exist_ok=True)
        info = client.upload_folder(
            repo_id=upload.repo_id, folder_path=upload.folder, commit_message=upload.commit_message,
            commit_description=upload.commit_description, create_pr=upload.create_pr,
            delete_patterns=upload.delete_patterns,
        )
    except OfflineModeIsEnabled as err:
        raise OutputError(
            f"HF_HUB_OFFLINE=1 blocks the upload to {upload.repo_id}; the repaired model is in {upload.folder}. "
            "Unset it to push (cached inputs are not downloaded again), or add --dry-run."
        ) from err
    except httpx2.TransportError as err:
        raise OutputError(f"cannot reach the Hub to push to {upload.repo_id} ({err}); "
                          f"the repaired model is in {upload.folder}.") from err
    except HfHubHTTPError as err:
        raise OutputError(
            f"cannot push to {upload.repo_id}: {str(err).splitlines()[0]} (check `hf auth whoami` and write access; "
            "--create-pr proposes the change to a repo you do not own)."
        ) from err
    return getattr(info, "pr_url", None) or getattr(info, "commit_url", None)
