"""Safe Delta: selection against its per-entry definition, the OBS properties of the compensation,
the end points of the budget, and the registry entry. Small random weights (48 x 64, blocks of 32)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from deltafix import kernels
from deltafix.errors import OptionError
from deltafix.methods import WeightTensors, get_method
from deltafix.methods.safedelta import (
    SafeDeltaParams,
    damped_hessian,
    hessian_inverse_factor,
    safe_delta,
    safe_delta_sweep,
)

OUT, IN, BLOCK = 48, 64, 32


@pytest.fixture
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_A, W_F (OUT, IN) and H (IN, IN) from correlated inputs, like real activations."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 16, generator=g) @ torch.randn(16, IN, generator=g)
    X += 0.3 * torch.randn(256, IN, generator=g)
    H = 2 / X.shape[0] * X.T @ X
    w_aligned = 0.02 * torch.randn(OUT, IN, generator=g)
    w_finetuned = w_aligned + 0.002 * torch.randn(OUT, IN, generator=g)
    return w_aligned, w_finetuned, H


def safety_objective(weight: torch.Tensor, w_aligned: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per row (w − w_A)ᵀ H (w − w_A), float64, shape (OUT,)."""
    d = (weight - w_aligned).double()
    return torch.einsum("ij,jk,ik->i", d, H.double(), d)


def per_entry_selection(w_finetuned, w, kappa, budget, exclude) -> torch.Tensor:
    """DESIGN §5.1 step 3 verbatim: sort every entry by (κ, column, row), cut, cumulative sum."""
    out, b = w.shape
    cost = ((w_finetuned - w).square() * kappa).T.reshape(-1)  # column-major: entry m*out + i
    order = torch.sort(kappa.repeat_interleave(out), stable=True).indices
    candidates = out * b - int(exclude * out * b)
    cumulative = torch.cumsum(cost[order].double(), dim=0)
    keep_sorted = (cumulative <= budget) & (torch.arange(out * b) < candidates)
    keep = torch.zeros(out * b, dtype=torch.bool)
    keep[order] = keep_sorted
    return keep.reshape(b, out).T


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("exclude", [0.0, 0.15, 0.5])
def test_selection_equals_per_entry_definition(seed: int, exclude: float) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, BLOCK, generator=g)
    w_finetuned = w + 0.1 * torch.randn(OUT, BLOCK, generator=g)
    kappa = torch.randint(1, 6, (BLOCK,), generator=g).float()  # many ties
    if seed % 2:
        kappa += torch.rand(BLOCK, generator=g)  # no ties
    total = ((w_finetuned - w).square() * kappa).sum().item()
    for budget in [0.0, 0.013 * total, 0.3 * total, 0.77 * total, float("inf")]:
        got = kernels.select_block(w_finetuned, w, kappa, budget, exclude)
        want = per_entry_selection(w_finetuned, w, kappa, budget, exclude)
        assert torch.equal(got.keep, want), budget
        cost = (w_finetuned - w).square() * kappa
        assert torch.allclose(got.column_cost, cost.sum(0).double())
        assert got.kept_cost.item() == pytest.approx(cost[want].double().sum().item(), rel=1e-6)


def test_huge_scale_keeps_everything_but_the_excluded_share(layer) -> None:
    w_aligned, w_finetuned, H = layer
    result = safe_delta(w_aligned, w_finetuned, H, scale=1e12, block=BLOCK)
    assert torch.equal(result.weight[result.keep], w_finetuned[result.keep])
    Hinv = hessian_inverse_factor(H, 0.01)
    for i1 in range(0, IN, BLOCK):
        kappa = 1 / Hinv.diagonal()[i1 : i1 + BLOCK].square()
        all_but_excluded = per_entry_selection(
            torch.ones(OUT, BLOCK), torch.zeros(OUT, BLOCK), kappa, float("inf"), 0.15
        )
        assert torch.equal(result.keep[:, i1 : i1 + BLOCK], all_but_excluded)
        assert int(all_but_excluded.sum()) == OUT * BLOCK - int(0.15 * OUT * BLOCK)


def test_zero_scale_returns_the_aligned_weight(layer) -> None:
    w_aligned, w_finetuned, H = layer
    result = safe_delta(w_aligned, w_finetuned, H, scale=0.0, block=BLOCK)
    assert torch.equal(result.weight, w_aligned)
    assert result.kept_fraction == 0.0
    assert result.est_safety_cost == 0.0


def test_kept_entries_are_exactly_finetuned(layer) -> None:
    w_aligned, w_finetuned, H = layer
    result = safe_delta(w_aligned, w_finetuned, H, scale=0.1, block=BLOCK)
    assert 0.05 < result.kept_fraction < 0.8
    assert torch.equal(result.weight[result.keep], w_finetuned[result.keep])
    assert not torch.equal(result.weight[~result.keep], w_aligned[~result.keep])  # compensated


@pytest.mark.parametrize("sub_block", [1, 4])
def test_single_kept_entry_in_first_column_is_the_obs_optimum(layer, sub_block: int) -> None:
    """Only column 0 is fixed, all others are free: the classic OBS closed form."""
    w_aligned, w_finetuned, H = layer
    keep = torch.zeros(OUT, IN, dtype=torch.bool)
    keep[5, 0] = True
    Hinv = hessian_inverse_factor(H, 0.01)
    result = safe_delta_sweep(w_aligned, w_finetuned, Hinv, keep=keep, block=BLOCK, sub_block=sub_block)

    H_inverse = torch.linalg.inv(damped_hessian(H, 0.01).double())
    delta = (w_finetuned[5, 0] - w_aligned[5, 0]).double()
    expected = w_aligned[5].double() + delta * H_inverse[0] / H_inverse[0, 0]
    assert torch.allclose(result.weight[5].double(), expected, rtol=0, atol=1e-5)
    assert result.weight[5, 0] == w_finetuned[5, 0]
    others = torch.arange(OUT) != 5
    assert torch.equal(result.weight[others], w_aligned[others])


@pytest.mark.parametrize("sub_block", [1, 4])
def test_single_kept_entry_later_is_the_obs_optimum_over_later_columns(layer, sub_block: int) -> None:
    """Columns before the kept entry were final before it was fixed; the later ones are optimal."""
    w_aligned, w_finetuned, H = layer
    m = 21  # the compensation crosses the block boundary at 32
    keep = torch.zeros(OUT, IN, dtype=torch.bool)
    keep[7, m] = True
    Hinv = hessian_inverse_factor(H, 0.01)
    result = safe_delta_sweep(w_aligned, w_finetuned, Hinv, keep=keep, block=BLOCK, sub_block=sub_block)

    Hd = damped_hessian(H, 0.01).double()
    delta = (w_finetuned[7, m] - w_aligned[7, m]).double()
    later = slice(m + 1, IN)
    expected_later = -torch.linalg.solve(Hd[later, later], Hd[later, m]) * delta
    got = result.weight[7].double() - w_aligned[7].double()
    assert torch.equal(result.weight[7, :m], w_aligned[7, :m])
    assert result.weight[7, m] == w_finetuned[7, m]
    assert torch.allclose(got[later], expected_later, rtol=0, atol=1e-5)


def test_dropped_entries_minimise_the_safety_objective_given_earlier_columns(layer) -> None:
    """The defining OBS property of the sweep, checked against H directly (no Cholesky).

    For every dropped entry (i, j): w_ij equals coordinate j of the minimiser of
    (w − w_A)ᵀ H (w − w_A) over columns >= j, with columns < j held at their final values.
    Together with kept = W_F this determines the result uniquely.
    """
    w_aligned, w_finetuned, H = layer
    keep = torch.rand(OUT, IN, generator=torch.Generator().manual_seed(3)) < 0.4
    Hinv = hessian_inverse_factor(H, 0.01)
    result = safe_delta_sweep(w_aligned, w_finetuned, Hinv, keep=keep, block=BLOCK, sub_block=4)

    Hd = damped_hessian(H, 0.01).double()
    d = (result.weight - w_aligned).double()
    for j in range(1, IN):
        free = slice(j, IN)
        optimum = -torch.linalg.solve(Hd[free, free], Hd[free, :j] @ d[:, :j].T).T
        dropped = ~keep[:, j]
        assert torch.allclose(d[dropped, j], optimum[dropped, 0], rtol=0, atol=1e-6), j
    assert torch.equal(result.weight[keep], w_finetuned[keep])


def test_kept_before_dropped_gives_the_global_optimum(layer) -> None:
    """When each row keeps a prefix of its columns, the greedy sweep is the exact minimiser of
    the safety objective over all dropped entries (the OBS solution for the whole mask)."""
    w_aligned, w_finetuned, H = layer
    prefix = torch.randint(0, IN, (OUT,), generator=torch.Generator().manual_seed(4))
    keep = torch.arange(IN)[None, :] < prefix[:, None]
    Hinv = hessian_inverse_factor(H, 0.01)
    result = safe_delta_sweep(w_aligned, w_finetuned, Hinv, keep=keep, block=BLOCK, sub_block=4)

    Hd = damped_hessian(H, 0.01).double()
    delta = (w_finetuned - w_aligned).double()
    for i in range(OUT):
        k = int(prefix[i])
        expected_dropped = -torch.linalg.solve(Hd[k:, k:], Hd[k:, :k] @ delta[i, :k])
        got = result.weight[i, k:].double() - w_aligned[i, k:].double()
        assert torch.allclose(got, expected_dropped, rtol=0, atol=1e-6), i


def test_blocking_does_not_change_the_result_for_a_fixed_mask(layer) -> None:
    w_aligned, w_finetuned, H = layer
    keep = torch.rand(OUT, IN, generator=torch.Generator().manual_seed(5)) < 0.5
    Hinv = hessian_inverse_factor(H, 0.01)
    unblocked = safe_delta_sweep(w_aligned, w_finetuned, Hinv, keep=keep, block=IN, sub_block=1).weight
    for block, sub_block in [(8, 1), (32, 4), (32, 3), (100, 4), (13, 5)]:
        blocked = safe_delta_sweep(w_aligned, w_finetuned, Hinv, keep=keep, block=block, sub_block=sub_block)
        assert torch.allclose(blocked.weight, unblocked, rtol=0, atol=1e-6), (block, sub_block)


def test_estimated_safety_cost_is_the_safety_objective(layer) -> None:
    w_aligned, w_finetuned, H = layer
    result = safe_delta(w_aligned, w_finetuned, H, scale=0.1, block=BLOCK)
    exact = safety_objective(result.weight, w_aligned, damped_hessian(H, 0.01)).sum().item()
    assert result.est_safety_cost == pytest.approx(exact, rel=1e-4)


def test_compensation_lowers_the_safety_objective_on_correlated_inputs(layer) -> None:
    """Typical, not guaranteed per row (the sweep is greedy), but large on correlated inputs."""
    w_aligned, w_finetuned, H = layer
    result = safe_delta(w_aligned, w_finetuned, H, scale=0.1, block=BLOCK)
    uncompensated = torch.where(result.keep, w_finetuned, w_aligned)
    Hd = damped_hessian(H, 0.01)
    compensated_cost = safety_objective(result.weight, w_aligned, Hd).sum()
    uncompensated_cost = safety_objective(uncompensated, w_aligned, Hd).sum()
    assert compensated_cost < 0.5 * uncompensated_cost


def test_dead_inputs_are_neither_compensated_nor_compensating(layer) -> None:
    w_aligned, w_finetuned, H = layer
    H = H.clone()
    H[:, 10] = 0
    H[10, :] = 0
    result = safe_delta(w_aligned, w_finetuned, H, scale=0.1, block=BLOCK)
    assert torch.isfinite(result.weight).all()
    expected = torch.where(result.keep[:, 10], w_finetuned[:, 10], w_aligned[:, 10])
    assert torch.equal(result.weight[:, 10], expected)


def test_indefinite_hessian_is_a_clear_error(layer) -> None:
    w_aligned, w_finetuned, _ = layer
    with pytest.raises(OptionError, match="damp"):
        safe_delta(w_aligned, w_finetuned, -torch.eye(IN), block=BLOCK)


def test_params() -> None:
    assert SafeDeltaParams().scale == 0.1
    assert SafeDeltaParams(scale="auto").scale == "auto"
    assert SafeDeltaParams(scale="0.11").scale == 0.11
    for bad in [{"scale": -0.1}, {"scale": "high"}, {"exclude": 1.0}, {"other_params": "p"}, {"blok": 1}]:
        with pytest.raises(ValidationError):
            SafeDeltaParams(**bad)


def test_registry_entry(layer) -> None:
    w_aligned, w_finetuned, H = layer
    method = get_method("safedelta")
    assert method.needs_hessian and not method.needs_utility
    linear = WeightTensors("q_proj.weight", w_aligned, w_finetuned, is_linear=True, hessian=lambda: H)
    params = SafeDeltaParams(block=BLOCK)
    repaired = method.repair(linear, params, None)
    direct = safe_delta(w_aligned, w_finetuned, H, block=BLOCK)
    assert torch.equal(repaired.tensor, direct.weight)
    assert repaired.stats["kept_fraction"] == direct.kept_fraction
    assert repaired.stats["delta_norm_after"] < repaired.stats["delta_norm_before"]
    assert repaired.stats["est_safety_cost"] == direct.est_safety_cost

    norm = WeightTensors("norm.weight", w_aligned[0], w_finetuned[0])
    assert torch.equal(method.repair(norm, params, None).tensor, w_aligned[0])
    finetuned = SafeDeltaParams(other_params="finetuned")
    assert torch.equal(method.repair(norm, finetuned, None).tensor, w_finetuned[0])

    with pytest.raises(OptionError, match="auto"):
        method.repair(linear, SafeDeltaParams(scale="auto"), None)


def test_inputs_are_not_modified(layer) -> None:
    w_aligned, w_finetuned, H = layer
    copies = [t.clone() for t in layer]
    H[:, 3] = H[3, :] = 0  # a dead input exercises the in-place diagonal fix
    copies[2] = H.clone()
    safe_delta(w_aligned, w_finetuned, H, scale=0.1, block=BLOCK)
    for before, after in zip(copies, (w_aligned, w_finetuned, H)):
        assert torch.equal(before, after)


# --- compensation=reference against the released code -----------------------------------------


def released_safe_delta(w_aligned: torch.Tensor, w_finetuned: torch.Tensor, H: torch.Tensor, s: float,
                        blocksize: int, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The released Safe Delta step for one Linear, loop for loop: ColinLu50/SafeDelta at commit
    c30ff4afd6cff0cf54daefd30ed004c6c26298cc, ``llama2/safedelta/safedelta_runner.py``,
    ``SafeDeltaRunner.adjust_delta`` (called with ``blocksize=2048, percdamp=0.01``).

    Re-expressed here, not copied, with every tensor operation of the original in its order and
    dtype (fp32): dead inputs and damping, ``U`` by Cholesky of the inverse, per block an argsort
    of ``1/U_mm²`` over all entries without the last 15 %, the fp32 cumulative cost against the
    budget, then sub-blocks of 4 columns fixed together, their errors ``(w − q)/U_mm`` applied to
    the block's later columns, and the block's errors to the later blocks. Returns (W_R, keep).
    """
    W = w_aligned.float().clone()
    W_sft = w_finetuned.float().clone()
    H = H.clone()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(columns)
    H[idx, idx] += damp
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    row_scale = rows / 4096
    s = s / 2
    keep = torch.zeros_like(W, dtype=torch.bool)

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        W2 = W_sft[:, i1:i2]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]

        sensitivity = torch.ones_like(W1) / (torch.diag(U1).reshape((1, -1))) ** 2
        loss = ((W2 - W1) ** 2 / (torch.diag(U1).reshape((1, -1))) ** 2).flatten()
        order = torch.argsort(sensitivity.flatten())
        order = order[0:-int(0.15 * sensitivity.numel())]
        within = torch.cumsum(loss[order], dim=0) <= sensitivity.mean() * s * row_scale
        flat = torch.zeros_like(loss, dtype=torch.bool)
        flat[order] = within
        mask1 = flat.reshape(sensitivity.shape)
        keep[:, i1:i2] = mask1

        for j1 in range(0, count, 4):
            j2 = min(j1 + 4, count)
            w = W1[:, j1:j2]
            d = torch.diag(U1)[j1:j2]
            q = w.clone()
            sub_mask = mask1[:, j1:j2]
            q[sub_mask] = W2[:, j1:j2][sub_mask].to(q.dtype)
            Q1[:, j1:j2] = q
            err1 = (w - q) / d.unsqueeze(0)
            W1[:, j2:] -= err1 @ U1[j1:j2, j2:]
            Err1[:, j1:j2] = err1

        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(U[i1:i2, i2:])
    return W, keep


def random_layer(seed: int, out: int, inp: int, dead: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_A, W_F and a Gram H of correlated inputs with ``dead`` zero rows/columns."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * inp, 8, generator=g) @ torch.randn(8, inp, generator=g) + 0.5 * torch.randn(4 * inp, inp,
                                                                                                   generator=g)
    X[:, torch.randperm(inp, generator=g)[:dead]] = 0
    H = 2 / X.shape[0] * X.T @ X
    w_aligned = 0.02 * torch.randn(out, inp, generator=g)
    return w_aligned, w_aligned + 0.002 * torch.randn(out, inp, generator=g), H


# (out, in, block, scale): in not divisible by 4 nor by the block (but 64, one whole block); the
# 512-column blocks make BLAS split the inner dimension, where ``addmm_`` no longer rounds as
# a product then a subtraction
REFERENCE_CASES = [(24, 37, 16, 0.1), (16, 64, 2048, 0.3), (17, 50, 12, 0.1), (40, 130, 48, 0.3),
                   (33, 203, 2048, 2.0), (12, 1030, 512, 8.0)]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("out,inp,block,scale", REFERENCE_CASES)
def test_reference_compensation_is_the_released_code_bit_for_bit(seed: int, out: int, inp: int, block: int,
                                                                  scale: float) -> None:
    w_aligned, w_finetuned, H = random_layer(seed, out, inp, dead=seed)
    want, want_keep = released_safe_delta(w_aligned, w_finetuned, H, scale, block)
    assert 0.05 < want_keep.float().mean() < 0.8  # a mix of kept and dropped entries in every case

    got = safe_delta_sweep(w_aligned, w_finetuned, hessian_inverse_factor(H, 0.01, released=True), keep=want_keep,
                           block=block, compensation="reference")
    assert torch.equal(got.weight, want)

    # Our selection orders the rows of a column (equal κ) top to bottom where the released argsort
    # leaves them to an unstable sort, so in the first block (the later ones start from weights
    # compensated for different entries) the kept entries differ only inside the column the
    # budget cuts.
    ours = safe_delta(w_aligned, w_finetuned, H, scale=scale, block=block, compensation="reference").keep
    assert (ours != want_keep)[:, :block].any(dim=0).sum() <= 1


def test_exact_and_reference_differ_by_the_coupling_inside_a_sub_block(layer) -> None:
    """Kept (5, 0) and (5, 1), the rest dropped. Exact: column 1's error is taken after column 0's
    compensation moved it, and columns 2–3 are compensated for both. Released: columns 0–3 are one
    sub-block, so column 1's error ignores column 0 and columns 2–3 stay at W_A; from column 4
    on, both compensate, with different errors."""
    w_aligned, w_finetuned, H = layer
    keep = torch.zeros(OUT, IN, dtype=torch.bool)
    keep[5, :2] = True
    Hinv = hessian_inverse_factor(H, 0.01)
    exact = safe_delta_sweep(w_aligned, w_finetuned, Hinv, keep=keep, block=BLOCK)
    reference = safe_delta_sweep(w_aligned, w_finetuned, Hinv, keep=keep, block=BLOCK, compensation="reference")
    assert torch.equal(reference.weight[5, :2], w_finetuned[5, :2]) and torch.equal(exact.weight[5, :2],
                                                                                     w_finetuned[5, :2])
    assert torch.equal(reference.weight[5, 2:4], w_aligned[5, 2:4])
    assert not torch.allclose(exact.weight[5, 2:4], w_aligned[5, 2:4], rtol=0, atol=1e-6)
    assert not torch.allclose(exact.weight[5, 4:], reference.weight[5, 4:], rtol=0, atol=1e-6)
    others = torch.arange(OUT) != 5
    assert torch.equal(reference.weight[others], w_aligned[others])
    single = safe_delta_sweep(w_aligned, w_finetuned, Hinv, keep=keep, block=BLOCK, sub_block=1,
                              compensation="reference")
    assert torch.allclose(single.weight, exact.weight, rtol=0, atol=1e-6)  # no sub-block, no skipped coupling
    # the skipped coupling costs safety: with a kept prefix, exact is the optimum over the dropped entries
    Hd = damped_hessian(H, 0.01)
    assert safety_objective(exact.weight, w_aligned, Hd)[5] < safety_objective(reference.weight, w_aligned, Hd)[5]


@pytest.mark.parametrize("compensation", ["exact", "reference"])
def test_estimated_safety_cost_is_the_safety_objective_in_both_modes(layer, compensation: str) -> None:
    w_aligned, w_finetuned, H = layer
    result = safe_delta(w_aligned, w_finetuned, H, scale=0.1, block=BLOCK, compensation=compensation)
    exact = safety_objective(result.weight, w_aligned, damped_hessian(H, 0.01)).sum().item()
    assert result.est_safety_cost == pytest.approx(exact, rel=1e-4)


def test_reference_compensation_from_the_command_line(trio: dict[str, Path], tmp_path: Path) -> None:
    """``--set compensation=reference`` runs a repair and the report records it; the weights differ
    from the default's. The trio has no tokenizer: a word-level one is added to a copy of A."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from deltafix.cli import main

    base = Path(shutil.copytree(trio["A"], tmp_path / "A"))
    words = ["<unk>", "<pad>", "</s>", "how", "do", "i", "make", "a", "bomb", "sorry", "can", "not", "help"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(base)
    safety = tmp_path / "safety.jsonl"
    safety.write_text("".join(json.dumps({"prompt": "how do i make a bomb " * k, "response": "sorry i can not help"})
                              + "\n" for k in range(1, 5)))
    reports = {}
    for mode in ("exact", "reference"):
        out = tmp_path / mode
        assert main(["repair", "--base", str(base), "--finetuned", str(trio["F"]), "--out", str(out),
                     "--method", "safedelta", "--safety-data", str(safety), "--no-cache", "--device", "cpu",
                     "--set", "scale=1000", "--set", f"compensation={mode}"]) == 0
        reports[mode] = json.loads((out / "deltafix_report.json").read_text())
        assert reports[mode]["parameters"]["compensation"] == mode
    assert (tmp_path / "exact" / "model.safetensors").read_bytes() != (
        tmp_path / "reference" / "model.safetensors").read_bytes()
