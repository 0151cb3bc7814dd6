"""ReinforceLoRA + UserLoRA QR merge (Buffer-and-Reinforce, ICML 2026), DESIGN §5.5.

Per module, with the user adapter ``(A_u, B_u, s_u)`` and the ReinforceLoRA ``(A_r, B_r, s_r)``:

    ΔU = s_u B_u A_u,   ΔR = s_r B_r A_r                      (out, in)
    G = A_u A_uᵀ = V Λ Vᵀ;  keep λ_i > rank_guard · λ_max          (r_u, r_u)
    B_eff = B_u if every eigenvector is kept else B_u V_eff
    Q = reduced QR of B_eff                                     (out, k)
    ΔR⊥ = ΔR − α Q (Qᵀ ΔR)
    merged delta = c (ΔU + ΔR⊥)                                 α = 0.1, c = 0.5

The rank guard drops directions of B_u that A_u barely uses, so the projection removes the
user update's effective column space only. The same result as an adapter (*ours*): rank
``r_u + r_r``, ``A = [A_u ; A_r]``, ``B = c [s_u B_u | (I − αQQᵀ) s_r B_r]``, scaling 1.

One-sided modules: a module only the user adapter has gets ``c ΔU`` (DESIGN). A module only the
ReinforceLoRA has gets ``c ΔR``: that is the formula itself with ΔU = 0 (no user column space,
so nothing to project out), and it keeps the reinforce update on the same footing as the
others, which are also scaled by c.

Scope: plain LoRA only. DoRA modules (not low rank, base dependent) and ``lora_bias`` are refused;
so are full tensors saved by the ReinforceLoRA. Full tensors saved by the user adapter
(``modules_to_save``) are kept as the user trained them: c scales updates, and a saved full
value is not an update.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from deltafix.errors import InputError, MismatchError
from deltafix.io.lora import LoraAdapter, LoraModule, lora_delta, unit_scaling_config, write_adapter
from deltafix.options import MERGE_ALPHA as ALPHA, MERGE_SCALE as SCALE

RANK_GUARD = 0.01


def user_column_basis(A_u: torch.Tensor, B_u: torch.Tensor, rank_guard: float = RANK_GUARD) -> torch.Tensor:
    """Orthonormal basis Q (out, k) of the user update's effective column space, fp32.

    ``k`` is the number of eigenvalues of ``A_u A_uᵀ`` above ``rank_guard · λ_max`` (0 when A_u
    is zero, so nothing is projected out).
    """
    A_u, B_u = A_u.float(), B_u.float()
    eigenvalues, V = torch.linalg.eigh(A_u @ A_u.T)
    keep = eigenvalues > rank_guard * eigenvalues.max()
    B_eff = B_u if bool(keep.all()) else B_u @ V[:, keep]
    Q, _ = torch.linalg.qr(B_eff, mode="reduced")
    return Q


def qr_merge_delta(
    user: LoraModule | None,
    reinforce: LoraModule | None,
    alpha: float = ALPHA,
    scale: float = SCALE,
    rank_guard: float = RANK_GUARD,
) -> torch.Tensor:
    """Dense merged delta ``c (ΔU + ΔR⊥)`` (fp32) in the base weight's layout.

    Either module may be None (one-sided module): the result is then ``c ΔU`` or ``c ΔR``.
    """
    _check_pair(user, reinforce)
    if user is None or reinforce is None:
        return scale * (user or reinforce).delta()
    delta_u = lora_delta(user.A, user.B, user.scaling, fan_in_fan_out=False)
    delta_r = lora_delta(reinforce.A, reinforce.B, reinforce.scaling, fan_in_fan_out=False)
    Q = user_column_basis(user.A, user.B, rank_guard)
    delta_r_perp = delta_r - alpha * Q @ (Q.T @ delta_r)
    merged = scale * (delta_u + delta_r_perp)
    return merged.T if user.fan_in_fan_out else merged


def qr_merge_factors(
    user: LoraModule | None,
    reinforce: LoraModule | None,
    alpha: float = ALPHA,
    scale: float = SCALE,
    rank_guard: float = RANK_GUARD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same merge as LoRA factors at scaling 1: ``A (r_u + r_r, in)``, ``B (out, r_u + r_r)``, fp32.

    ``B A`` equals ``qr_merge_delta`` in (out, in) layout; one-sided modules keep their own rank.
    """
    _check_pair(user, reinforce)
    if user is None or reinforce is None:
        only = user or reinforce
        return only.A.float(), scale * only.scaling * only.B.float()
    Q = user_column_basis(user.A, user.B, rank_guard)
    B_r = reinforce.scaling * reinforce.B.float()
    B_r_perp = B_r - alpha * Q @ (Q.T @ B_r)
    A = torch.cat([user.A.float(), reinforce.A.float()], dim=0)
    B = scale * torch.cat([user.scaling * user.B.float(), B_r_perp], dim=1)
    return A, B


def _check_pair(user: LoraModule | None, reinforce: LoraModule | None) -> None:
    """Refuse what the merge is not defined for, in one sentence each."""
    if user is None and reinforce is None:
        raise ValueError("qr merge needs at least one module")
    for module in (user, reinforce):
        if module is None:
            continue
        if module.is_dora:
            raise InputError(f"module {module.path} is a DoRA module; the QR merge takes plain LoRA adapters only.")
        if module.bias is not None:
            raise InputError(f"module {module.path} trains a bias (lora_bias); the QR merge takes plain LoRA only.")
    if user is not None and reinforce is not None:
        if user.base_shape != reinforce.base_shape or user.fan_in_fan_out != reinforce.fan_in_fan_out:
            raise MismatchError(
                f"module {user.path} has weight shape {user.base_shape} in the user adapter but "
                f"{reinforce.base_shape} in the ReinforceLoRA; both must be trained on the same base."
            )


@dataclass
class MergedAdapter:
    """The QR merge of two adapters, as an adapter: config, factors and the user's saved tensors.

    ``factors`` maps base weight names to ``(A, B)`` at scaling 1; ``modules`` holds the module
    each came from (for PEFT key names); ``user`` supplies the saved full tensors.
    """

    config: dict
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    modules: dict[str, LoraModule]
    user: LoraAdapter

    def write(self, folder: str | Path) -> None:
        """Write the merged adapter (loads with ``PeftModel.from_pretrained`` on the base)."""
        write_adapter(
            folder, self.config, self.factors, modules=self.modules, extra_tensors=self.user.replacement_tensors()
        )


def merge_adapters(
    user: LoraAdapter,
    reinforce: LoraAdapter,
    alpha: float = ALPHA,
    scale: float = SCALE,
    rank_guard: float = RANK_GUARD,
) -> MergedAdapter:
    """QR-merge every module of the two adapters into one adapter (see module docstring)."""
    check_mergeable(user, reinforce)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules: dict[str, LoraModule] = {}
    for name in sorted(set(user.modules) | set(reinforce.modules)):
        u, r = user.modules.get(name), reinforce.modules.get(name)
        factors[name] = qr_merge_factors(u, r, alpha, scale, rank_guard)
        modules[name] = u or r
    ranks = {modules[name].path: A.shape[0] for name, (A, _) in factors.items()}
    return MergedAdapter(unit_scaling_config(user.config, ranks), factors, modules, user)


def merged_tensor(
    name: str,
    base_tensor: torch.Tensor,
    user: LoraAdapter,
    reinforce: LoraAdapter,
    alpha: float = ALPHA,
    scale: float = SCALE,
    rank_guard: float = RANK_GUARD,
) -> torch.Tensor:
    """Full-checkpoint value of base tensor ``name`` after the merge (fp32).

    The user's saved full value (if any) replaces the base, then the merged delta applies.
    Names outside ``user.touched_names | reinforce.touched_names`` come back unchanged.
    """
    value = (user.replacement(name) if name in user.replaced else base_tensor).float()
    u, r = user.modules.get(name), reinforce.modules.get(name)
    if u is None and r is None:
        return value
    return value + qr_merge_delta(u, r, alpha, scale, rank_guard)


def merged_names(user: LoraAdapter, reinforce: LoraAdapter) -> list[str]:
    """Base tensor names the merge changes, sorted."""
    return sorted(set(user.modules) | set(reinforce.modules) | set(user.replaced))


def check_mergeable(user: LoraAdapter, reinforce: LoraAdapter) -> None:
    """Check up front that the QR merge is defined for this pair (raises ``DeltafixError``)."""
    if reinforce.replaced:
        raise InputError(
            f"the ReinforceLoRA {reinforce.folder} saves full tensors ({', '.join(sorted(reinforce.replaced))}); "
            "the QR merge takes its LoRA modules only."
        )
    for name in set(user.modules) | set(reinforce.modules):
        _check_pair(user.modules.get(name), reinforce.modules.get(name))

