"""Gradient estimators through the non-differentiable nearest-code lookup.

Both are written as `q + (something whose value is exactly zero)`, so the forward value is the code vector q
bit for bit (also in bf16) and only the backward pass differs.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Below these the rotation is ill-defined or ill-conditioned; those rows fall back to straight-through.
_MIN_NORM = 1e-6  # |e| or |q|
_MIN_HALF_SUM = 1e-2  # |u + q^|: 1e-2 means e and q are within ~0.6 degrees of opposite


def straight_through(e: Tensor, q: Tensor) -> Tensor:
    """Straight-through estimator (van den Oord et al. 2017): e, q (N, D) -> value q, d/de = identity.

    Equal to e + sg(q - e), written so the forward value is exactly q rather than e + (q - e) rounded.
    """
    return q.detach() + (e - e.detach())


def rotation_trick(e: Tensor, q: Tensor, max_scale: float = 100.0) -> Tensor:
    """Rotation-trick estimator (Fifty et al. 2024, sec. 4.2): e, q (N, D) -> (N, D), same dtype as e.

    Forward value q; backward d/de = lambda R^T with R = I - 2 w w^T + 2 q^ u^T, u = e/|e|, q^ = q/|q|,
    w = (u + q^)/|u + q^|, lambda = |q|/|e| (clamped to `max_scale`). R is never built: with u, q^, w and
    lambda held constant (stop-gradient), sg(lambda) R e = q exactly, and R is linear, so
        sg(lambda) R e = sg(lambda) R (e - sg(e)) + q,
    which has the paper's gradient and, because e - sg(e) is exactly zero, the forward value q without the
    rounding that evaluating R e would leave. No gradient reaches q (codes learn from their own losses).
    Rows with |e| ~ 0, |q| ~ 0 or e ~ -q use straight-through instead. Computed in float32, autocast off.
    """
    dtype = e.dtype
    with torch.autocast(device_type=e.device.type, enabled=False):
        e32 = e.float()
        q32 = q.detach().float()
        delta = e32 - e32.detach()
        e_norm = e32.detach().norm(dim=-1, keepdim=True)
        q_norm = q32.norm(dim=-1, keepdim=True)
        u = e32.detach() / e_norm.clamp_min(_MIN_NORM)
        q_hat = q32 / q_norm.clamp_min(_MIN_NORM)
        half = u + q_hat
        half_norm = half.norm(dim=-1, keepdim=True)
        w = half / half_norm.clamp_min(_MIN_HALF_SUM)
        lam = (q_norm / e_norm.clamp_min(_MIN_NORM)).clamp(max=max_scale)
        rotated = lam * (delta - 2.0 * (delta * w).sum(-1, keepdim=True) * w
                         + 2.0 * (delta * u).sum(-1, keepdim=True) * q_hat)
        degenerate = (e_norm < _MIN_NORM) | (q_norm < _MIN_NORM) | (half_norm < _MIN_HALF_SUM)
        out = q32 + torch.where(degenerate, delta, rotated)
    return out.to(dtype)


def synchronized(z_q: Tensor, q: Tensor, nu: float) -> Tensor:
    """Synchronized commitment (Huh et al. 2023): add nu * (q - sg(q)) to an estimator output z_q.

    The value is unchanged; the code vectors q (and whatever produced them: codebook, affine parameters)
    receive nu times the gradient that reaches z_q, while the encoder's gradient is untouched.
    """
    if nu == 0.0:
        return z_q
    return z_q + (nu * (q - q.detach())).to(z_q.dtype)
