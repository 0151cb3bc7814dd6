"""SPAG, the safety correction of SPARD (step 2), as tensor math on the trainable parameters.

After each utility step, with the safety loss ℓ and its gradient g on a safety batch: if ℓ > τ,
move by the Polyak-style step ``θ ← θ − min((ℓ − τ) / ‖g‖², η_safe) · g``. To first order this
lowers ℓ to τ exactly (the projection of θ onto the half-space {ℓ ≤ τ} of the linearised loss),
capped at η_safe so that a tiny gradient cannot cause a huge jump.

The cap is a constant (``ETA_SAFE``), not the learning rate: the utility steps are AdamW steps,
which move every coordinate by about lr whatever the gradient's scale, while a step of size lr
along g moves θ by only lr·‖g‖. On the testbed the projection step (ℓ − τ)/‖g‖² is about 0.05
against lr = 0.002, so a cap of lr bound at every step and SPAG barely moved (ASR stayed 1.00).
With η_safe = 1 the move ``min((ℓ − τ)/‖g‖, η_safe·‖g‖)`` is never longer than
``sqrt(η_safe·(ℓ − τ))``, whatever ‖g‖, and the projection itself is left alone. The paper's
setting, η_safe = lr (SPARD's README: "set equal to the fine-tuning learning rate"), is the
shipped ``--recipe paper``.

The official code (github.com/shuhao02/SPARD, ``utils/SPAGOptimizerTrainer.py``) does something
else, offered as ``spag="code"``: when ℓ > τ + δ it rescales each gradient tensor on its own,
``g ← g · min((ℓ − τ)/(‖g‖ + 1e-8), α_max)`` (``code_rescale``), and then takes an AdamW step with
the optimizer the utility steps use. AdamW divides by its running gradient scale, so the factor
mostly sets how much this step weighs in the moments, not the step's length.
"""

from __future__ import annotations

import torch

from deltafix.options import ETA_SAFE

__all__ = ["CODE_EPS", "ETA_SAFE", "code_rescale", "spag_correct", "spag_step_size"]

CODE_EPS = 1e-8
"""Added to ‖g‖ in the official code's rescaling factor."""


def spag_step_size(loss: float, grad_sq_norm: float, tau: float, eta_safe: float) -> float:
    """min((ℓ − τ)/‖g‖², η_safe) when ℓ > τ, else 0 (no correction). A zero gradient gives η_safe."""
    if loss <= tau:
        return 0.0
    if grad_sq_norm <= 0:
        return eta_safe
    return min((loss - tau) / grad_sq_norm, eta_safe)


@torch.no_grad()
def spag_correct(params: list[torch.nn.Parameter], loss: float, tau: float, eta_safe: float) -> float:
    """Apply the SPAG correction in place using each parameter's ``.grad``; returns the step size (0: none).

    ``‖g‖²`` is summed over every parameter in ``params`` in fp32, so the step is one joint move of
    all trainable weights, not a per-tensor one.
    """
    grads = [(p, p.grad) for p in params if p.grad is not None]
    grad_sq_norm = float(sum(g.float().pow(2).sum() for _, g in grads)) if grads else 0.0
    step = spag_step_size(loss, grad_sq_norm, tau, eta_safe)
    if step > 0:
        for p, g in grads:
            p.sub_(step * g.to(p.dtype))
    return step


@torch.no_grad()
def code_rescale(grads: list[torch.Tensor], loss: float, tau: float, cap: float) -> list[float]:
    """The official code's per-tensor rescaling, in place: ``g ← g · min((ℓ − τ)/(‖g‖ + 1e-8), cap)``
    for each gradient tensor on its own (its own 2-norm, fp32); returns the factors, in order.

    Called only once the code variant has decided to step (ℓ > τ + δ); the factor uses ℓ − τ.
    """
    factors = []
    for g in grads:
        factor = min((loss - tau) / (float(torch.linalg.vector_norm(g.float())) + CODE_EPS), cap)
        g.mul_(factor)
        factors.append(factor)
    return factors
