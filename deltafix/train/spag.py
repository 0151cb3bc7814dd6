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
``sqrt(η_safe·(ℓ − τ))``, whatever ‖g‖, and the projection itself is left alone.
"""

from __future__ import annotations

import torch

from deltafix.options import ETA_SAFE

__all__ = ["ETA_SAFE", "spag_correct", "spag_step_size"]


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
