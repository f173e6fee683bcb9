"""Datafits: the smooth data term of the objective, evaluated on preallocated buffers."""

from __future__ import annotations

import torch


class Logistic:
    """Mean logistic loss ``Σ_i c_i·(softplus(z_i) − y_i·z_i) / n`` with per-sample weights ``c``.

    The solver needs: :meth:`loss_` (per-element loss, in place),
    :meth:`residual_` (``∂loss/∂z``, in place) and :attr:`curvature` (a bound on
    the second derivative, so ``L = curvature·λ_max(Φᵀ diag(c) Φ)/n``).
    """

    curvature = 0.25

    @staticmethod
    def loss_(z: torch.Tensor, y: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
        """Overwrite ``work`` with ``softplus(z) − y·z`` (stable form); ``z`` (nb, K), ``y`` (nb, 1)."""
        torch.abs(z, out=work)
        work.neg_().exp_().log1p_()
        return work.add_(z.clamp_min(0)).addcmul_(z, y.expand_as(z), value=-1.0)

    @staticmethod
    def residual_(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Overwrite ``z`` with ``σ(z) − y``."""
        return z.sigmoid_().sub_(y)
