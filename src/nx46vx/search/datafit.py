"""Datafits: the smooth data term of the objective, evaluated on preallocated buffers."""

from __future__ import annotations

import torch


class Logistic:
    """Weighted logistic loss ``Σ_i c_i·(softplus(z_i) − y_i·z_i)`` with per-sample weights ``c`` summing to 1.

    The weights are a meta-neuron's bootstrap multiplicities divided by ``n``, so the
    sum is the mean loss over its resample (no further ``1/n``). The solver needs:
    :meth:`loss_` (per-element loss, in place), :meth:`residual_` (``∂loss/∂z``, in
    place) and :attr:`curvature` (a bound on the second derivative, so
    ``L = curvature·λ_max(Φᵀ diag(c) Φ)``).
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
