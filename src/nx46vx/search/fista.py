"""Batched FISTA: all candidates of a batch advance together as one tensor computation.

The solver is separate from what it minimises. It needs from the datafit
``loss_``, ``residual_`` and ``curvature`` (see :class:`~nx46vx.search.datafit.Logistic`),
from the smooth penalty ``value`` and ``gradient``, and from the non-smooth penalty
``value`` and ``prox``. Data are scanned in row blocks with preallocated buffers:
one GEMM per block gives the logits at the extrapolated point ``y`` (for its
objective and the gradient), a second GEMM accumulates ``Φᵀ·R``; bootstrap
weights are broadcast over runs of candidates that share a meta-neuron.

On a CPU the same pass runs by default in the fused compiled kernel of
:mod:`nx46vx.search.native`; the torch path serves GPUs and CPUs without a C
compiler. Both return the same sums to float tolerance.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, NativeKernelError
from . import native
from .datafit import Logistic
from .penalties import L1, L2

log = logging.getLogger("nx46vx")
KERNELS = ("auto", "native", "torch")


@dataclass
class Design:
    """The shared training data of one epoch.

    Attributes
    ----------
    phi : Tensor, float32, shape (n, P)
        Design rows ``[x, x∘x, g, 1]`` (standardised).
    y : Tensor, float32, shape (n, 1)
        Labels in {0, 1}.
    weights : Tensor, float32, shape (n, M)
        Per meta-neuron bootstrap weights, each column summing to 1.
    penalised : Tensor, float32, shape (P,)
        1 for ``w, α, β`` coordinates, 0 for the bias.
    derived : dict
        What a solver derives once from these data (e.g. the fused kernel's row lists).
    """

    phi: torch.Tensor
    y: torch.Tensor
    weights: torch.Tensor
    penalised: torch.Tensor
    derived: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass
class FistaState:
    """Iterates of one batch: ``x`` (K, P), ``x_prev`` (K, P), momentum scalars and the iteration count."""

    x: torch.Tensor
    x_prev: torch.Tensor
    t: float = 1.0
    t_prev: float = 1.0
    iter: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x.cpu().clone(), "x_prev": self.x_prev.cpu().clone(), "t": self.t, "t_prev": self.t_prev, "iter": self.iter}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> "FistaState":
        return cls(state["x"].to(device), state["x_prev"].to(device), float(state["t"]), float(state["t_prev"]), int(state["iter"]))


class BatchedFISTA:
    """Proximal gradient with Nesterov momentum over a ``(candidates, parameters)`` state.

    Parameters
    ----------
    block_rows : int
        Rows of ``Φ`` per block of the torch path (~8 K rows keep the GEMMs
        efficient and avoid allocating ``(n, K)`` tensors).
    kernel : {"auto", "native", "torch"}
        Where the data pass runs on a CPU: ``native`` = the fused compiled kernel
        (:class:`~nx46vx.errors.NativeKernelError` when it cannot be built),
        ``torch`` = eager torch, ``auto`` = native when it builds, else torch.
        On a GPU the torch path always runs.
    """

    datafit = Logistic
    smooth_penalty = L2
    prox_penalty = L1

    def __init__(self, *, block_rows: int = 8192, kernel: str = "auto") -> None:
        if kernel not in KERNELS:
            raise ConfigError("unknown search kernel", expected=" or ".join(KERNELS), found=kernel)
        self.block_rows = block_rows
        self.kernel = kernel
        self._fused: native.FusedLogistic | None = None
        self._fused_failed = False

    def kernel_for(self, device: torch.device) -> str:
        """The data pass that runs on ``device``: ``"native"`` or ``"torch"`` (builds the kernel on first call)."""
        return "native" if self._fused_kernel(device) is not None else "torch"

    def _fused_kernel(self, device: torch.device) -> native.FusedLogistic | None:
        if self.kernel == "torch" or device.type != "cpu" or self.datafit is not Logistic or self._fused_failed:
            return None
        if self._fused is None:
            try:
                self._fused = native.load()
            except NativeKernelError as err:
                if self.kernel == "native":
                    raise
                self._fused_failed = True
                log.warning("fused search kernel unavailable, the search runs in eager torch (slower): %s", err)
                return None
        return self._fused

    @staticmethod
    def init_state(theta: torch.Tensor) -> FistaState:
        """Start (or warm-start) from ``theta`` (K, P) with fresh momentum."""
        return FistaState(theta.clone(), theta.clone())

    def lipschitz(self, design: Design, metas: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
        """Per-candidate Lipschitz constant of the smooth part: ``curvature·λ_max(Φᵀ diag(c_m) Φ) + λ₂``.

        Parameters
        ----------
        metas : Tensor, int64, shape (K,)
            Meta-neuron of each candidate (its bootstrap column).
        l2 : Tensor, shape (K,)
        """
        lam = torch.empty(design.weights.shape[1], dtype=torch.float64)
        phi64 = design.phi.double()
        for m in range(design.weights.shape[1]):
            gram = phi64.T @ (phi64 * design.weights[:, m : m + 1].double())
            lam[m] = torch.linalg.eigvalsh(gram)[-1]
        return (self.datafit.curvature * lam[metas.cpu()].to(l2.device, torch.float64) + l2.double()).to(torch.float32)

    @staticmethod
    def _weight_layout(metas: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """(meta-neuron of each group, group size) when candidates come in equal runs of one meta-neuron.

        Then a block's weights are multiplied in by broadcasting ``(nb, groups, size)``
        instead of gathering an ``(nb, K)`` copy; None means "gather".
        """
        groups, counts = torch.unique_consecutive(metas, return_counts=True)
        if bool((counts == counts[0]).all()) and groups.numel() * int(counts[0]) == metas.numel():
            return groups, int(counts[0])
        return None

    def _scan(
        self, design: Design, theta: torch.Tensor, metas: torch.Tensor, with_gradient: bool, with_loss: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One pass over the rows at ``theta`` (K, P).

        Returns the weighted data loss per candidate (K,) float64 when ``with_loss``
        (else None) and, when ``with_gradient``, ``Φᵀ R`` (P, K) at the same point.
        """
        fused = self._fused_kernel(theta.device)
        if fused is not None:
            return self._scan_fused(fused, design, theta, metas, with_gradient, with_loss)
        n, p = design.phi.shape
        k = theta.shape[0]
        dev = theta.device
        loss_sum = torch.zeros(k, dtype=torch.float64, device=dev)
        grad = torch.zeros(p, k, dtype=torch.float32, device=dev) if with_gradient else None
        rows = self.block_rows
        z_buf = torch.empty(rows, k, dtype=torch.float32, device=dev)
        work_buf = torch.empty(rows, k, dtype=torch.float32, device=dev)
        theta_t = theta.T.contiguous()
        layout = self._weight_layout(metas)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            nb = stop - start
            phi_b, y_b = design.phi[start:stop], design.y[start:stop]
            z = z_buf[:nb]
            torch.matmul(phi_b, theta_t, out=z)
            if layout is None:
                w_b = design.weights[start:stop].index_select(1, metas)  # (nb, K)
                weigh = lambda t: t.mul_(w_b)  # noqa: E731
            else:
                groups, size = layout
                w_b = design.weights[start:stop].index_select(1, groups)[:, :, None]  # (nb, groups, 1)
                weigh = lambda t: t.view(nb, -1, size).mul_(w_b)  # noqa: E731
            if with_loss:
                loss = self.datafit.loss_(z, y_b, work_buf[:nb])
                weigh(loss)
                loss_sum += loss.sum(dim=0)
            if with_gradient:
                resid = self.datafit.residual_(z, y_b)
                weigh(resid)
                grad.addmm_(phi_b.T, resid)
        return loss_sum if with_loss else None, grad

    @staticmethod
    def _scan_fused(
        fused: native.FusedLogistic, design: Design, theta: torch.Tensor, metas: torch.Tensor, with_gradient: bool, with_loss: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """:meth:`_scan` in the compiled kernel, which visits only rows with a non-zero weight."""
        metas_np = metas.cpu().numpy()
        key = ("fused_layout", metas_np.tobytes())
        if key not in design.derived:
            design.derived[key] = fused.layout(design.weights.numpy(), metas_np)
        if "fused_arrays" not in design.derived:
            # the kernel reads raw float32 memory
            design.derived["fused_arrays"] = (
                design.phi.to(torch.float32).contiguous().numpy(),
                design.y.reshape(-1).to(torch.float32).contiguous().numpy(),
            )
        phi, y = design.derived["fused_arrays"]
        loss, grad = fused.scan(phi, y, design.derived[key], theta.detach().to(torch.float32).contiguous().numpy(), with_gradient=with_gradient, with_loss=with_loss)
        return None if loss is None else torch.from_numpy(loss), None if grad is None else torch.from_numpy(grad)

    def objective(self, design: Design, theta: torch.Tensor, metas: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
        """Full objective per candidate (K,), float64."""
        data, _ = self._scan(design, theta, metas, with_gradient=False)
        assert data is not None
        return data + self._penalty(theta, l1, l2, design.penalised)

    def _penalty(self, theta: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (self.smooth_penalty.value(theta, l2, mask) + self.prox_penalty.value(theta, l1, mask)).double()

    def step(
        self,
        design: Design,
        state: FistaState,
        metas: torch.Tensor,
        l1: torch.Tensor,
        l2: torch.Tensor,
        lipschitz: torch.Tensor,
        *,
        with_objective: bool = True,
    ) -> tuple[FistaState, torch.Tensor | None]:
        """One FISTA iteration.

        Returns
        -------
        FistaState
            The next state (the input is not modified; it does not depend on ``with_objective``).
        Tensor, float64, shape (K,), or None
            With ``with_objective``: the objective at the extrapolated point
            ``y = x + m·(x − x_prev)`` where the gradient is taken (``y = x`` on the
            first iteration of a batch). Taking it there shares the logits of the
            gradient pass, so it costs no second product, only the softplus (about a
            fifth of the pass: the step itself never needs it, the step size being
            ``1/L``). The objective of the final iterate is computed separately
            (:meth:`objective`).
        """
        momentum = (state.t_prev - 1.0) / state.t
        x = state.x
        y = x + momentum * (x - state.x_prev)
        data, grad = self._scan(design, y, metas, with_gradient=True, with_loss=with_objective)
        objective = data + self._penalty(y, l1, l2, design.penalised) if data is not None else None
        grad_y = grad.T + self.smooth_penalty.gradient(y, l2, design.penalised)
        step = 1.0 / lipschitz
        x_new = self.prox_penalty.prox(y - step[:, None] * grad_y, l1 * step, design.penalised)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * state.t * state.t)) / 2.0
        return FistaState(x_new, x, t_next, state.t, state.iter + 1), objective
