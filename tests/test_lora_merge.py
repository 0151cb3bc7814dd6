"""ReinforceLoRA + UserLoRA QR merge (DESIGN 5.5): the formula's properties and its adapter form."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft_models import peft_merged, save_adapter, save_base, tiny_llama

from deltafix.errors import InputError, MismatchError
from deltafix.io.lora import LoraAdapter, LoraModule
from deltafix.io.reader import CheckpointReader
from deltafix.methods.qr_merge import (
    merge_adapters,
    merged_names,
    merged_tensor,
    qr_merge_delta,
    qr_merge_factors,
    user_column_basis,
)

OUT, IN = 24, 16


def module(rank: int, scaling: float, seed: int, fan_in_fan_out: bool = False, A=None) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, IN, generator=g) if A is None else A
    return LoraModule(A, torch.randn(OUT, rank, generator=g), scaling, fan_in_fan_out, path=f"m{seed}")


def dense(m: LoraModule) -> torch.Tensor:
    """s B A in (out, in) layout, computed here independently of the library."""
    return m.scaling * m.B @ m.A


def projector(basis: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthogonal projector onto the span of ``basis``'s top-``rank`` left singular vectors."""
    U = torch.linalg.svd(basis.double(), full_matrices=False).U[:, :rank]
    return (U @ U.T).float()


@pytest.fixture
def user():
    return module(4, 2.0, seed=1)


@pytest.fixture
def reinforce():
    return module(3, 0.5, seed=2)


def test_alpha_zero_is_the_scaled_sum(user, reinforce):
    merged = qr_merge_delta(user, reinforce, alpha=0.0, scale=0.5)
    torch.testing.assert_close(merged, 0.5 * (dense(user) + dense(reinforce)), atol=1e-5, rtol=0)


def test_alpha_one_leaves_reinforce_orthogonal_to_user_columns(user, reinforce):
    merged = qr_merge_delta(user, reinforce, alpha=1.0, scale=0.5)
    reinforce_perp = merged / 0.5 - dense(user)
    P = projector(user.B, 4)
    assert (P @ reinforce_perp).abs().max() < 1e-5
    assert (P @ dense(reinforce)).abs().max() > 1e-2  # there was something to remove
    # Default α removes only a tenth of that component.
    default = qr_merge_delta(user, reinforce) / 0.5 - dense(user)
    torch.testing.assert_close(P @ default, 0.9 * P @ dense(reinforce), atol=1e-5, rtol=0)


def test_rank_guard_drops_the_collapsed_direction():
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(3, IN, generator=g)
    collapsed = torch.cat([rows, rows[:1]])  # A_u with two identical rows: A_u A_uᵀ has rank 3
    user = module(4, 1.0, seed=1, A=collapsed)
    reinforce = module(3, 1.0, seed=2)
    assert user_column_basis(user.A, user.B).shape == (OUT, 3)
    assert user_column_basis(module(4, 1.0, seed=1).A, user.B).shape == (OUT, 4)
    perp = qr_merge_delta(user, reinforce, alpha=1.0, scale=1.0) - dense(user)
    # The user update spans 3 columns of B_u: only those are projected out, not all of B_u's 4.
    assert (projector(dense(user), 3) @ perp).abs().max() < 1e-5
    assert (projector(user.B, 4) @ perp).abs().max() > 1e-2
    nearly = module(4, 1.0, seed=1, A=torch.cat([rows, rows[:1] + 1e-3 * torch.randn(1, IN, generator=g)]))
    assert user_column_basis(nearly.A, nearly.B).shape == (OUT, 3)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_adapter_form_equals_dense(fan_in_fan_out):
    user = module(4, 2.0, seed=1, fan_in_fan_out=fan_in_fan_out)
    reinforce = module(3, 0.5, seed=2, fan_in_fan_out=fan_in_fan_out)
    for u, r in [(user, reinforce), (user, None), (None, reinforce)]:
        A, B = qr_merge_factors(u, r)
        assert A.shape[0] == (u.rank if u else 0) + (r.rank if r else 0)
        delta = B @ A
        torch.testing.assert_close(delta.T if fan_in_fan_out else delta, qr_merge_delta(u, r), atol=1e-5, rtol=0)


def test_one_sided_modules_are_scaled_by_c(user, reinforce):
    torch.testing.assert_close(qr_merge_delta(user, None, scale=0.5), 0.5 * dense(user), atol=1e-6, rtol=0)
    torch.testing.assert_close(qr_merge_delta(None, reinforce, scale=0.5), 0.5 * dense(reinforce), atol=1e-6, rtol=0)


def test_refuses_dora_and_mismatched_shapes(user, reinforce):
    dora = LoraModule(user.A, user.B, 1.0, False, dora_magnitude=torch.ones(OUT), path="q")
    with pytest.raises(InputError, match="DoRA"):
        qr_merge_delta(dora, reinforce)
    wide = LoraModule(torch.randn(3, IN + 1), torch.randn(OUT, 3), 1.0, False, path="q")
    with pytest.raises(MismatchError):
        qr_merge_factors(user, wide)


def test_merged_adapter_loads_in_peft_and_matches_dense(tmp_path):
    base = save_base(tiny_llama(), tmp_path / "base")
    user_dir = save_adapter(
        base,
        tmp_path / "user",
        LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "embed_tokens"],
                   modules_to_save=["lm_head"], init_lora_weights=False),
        seed=1,
    )
    reinforce_dir = save_adapter(
        base,
        tmp_path / "reinforce",
        LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False),
        seed=2,
    )
    reader = CheckpointReader(base)
    user = LoraAdapter.load(user_dir, reader)
    reinforce = LoraAdapter.load(reinforce_dir, reader)
    merged = merge_adapters(user, reinforce)
    assert merged.factors["model.layers.0.self_attn.q_proj.weight"][0].shape[0] == 7
    assert merged.factors["model.layers.0.mlp.up_proj.weight"][0].shape[0] == 3
    merged.write(tmp_path / "merged")
    peft_weights = peft_merged(base, tmp_path / "merged")
    changed = set(merged_names(user, reinforce))
    assert "lm_head.weight" in changed and "model.layers.1.mlp.up_proj.weight" in changed
    for name in reader.names:
        ours = merged_tensor(name, reader.get(name), user, reinforce)
        torch.testing.assert_close(ours, peft_weights[name], atol=1e-5, rtol=0)
        if name not in changed:
            assert torch.equal(ours, reader.get(name).float())
