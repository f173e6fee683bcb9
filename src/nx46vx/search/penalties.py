"""Penalties on the non-bias parameters ``(w, α, β)``: smooth L2 and proximal L1."""

from __future__ import annotations

import torch


class L2:
    """``(λ₂/2)·‖θ‖²`` on the penalised coordinates; smooth, enters the gradient and the step size."""

    @staticmethod
    def value(theta: torch.Tensor, strength: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-candidate value; ``theta`` (K, P), ``strength`` (K,), ``mask`` (P,) 1 where penalised."""
        return 0.5 * strength * ((theta * mask) ** 2).sum(dim=1)

    @staticmethod
    def gradient(theta: torch.Tensor, strength: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return strength[:, None] * theta * mask


class L1:
    """``λ₁·‖θ‖₁`` on the penalised coordinates; handled by its proximal operator (soft-threshold)."""

    @staticmethod
    def value(theta: torch.Tensor, strength: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return strength * (theta.abs() * mask).sum(dim=1)

    @staticmethod
    def prox(theta: torch.Tensor, threshold: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Soft-threshold ``theta`` (K, P) by ``threshold`` (K,) where ``mask`` is 1; bias untouched."""
        shrunk = torch.sign(theta) * (theta.abs() - threshold[:, None]).clamp_min(0)
        return torch.where(mask.bool(), shrunk, theta)
