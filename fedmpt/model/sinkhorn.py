"""Entropic optimal transport by log-domain Sinkhorn, and FedMPT's condition-guided transport scores.

FedMPT (CVPR 2026, "Condition-Guided Optimal Transport") aligns, for every condition ``n``, the ``M`` image
patches of one image with the ``C`` class prompts of that condition by an entropic OT plan, and scores class
``c`` by the similarity the plan transports to it. This module holds the one Sinkhorn solver of the project
(:func:`sinkhorn_log`, tested against POT) and the scoring layer built on it (:class:`ConditionTransport`).

Everything is batched over leading dimensions, and every problem of a batch is solved independently of the
others (per-problem early stopping), so a sample's result never depends on which other samples share its
batch: a requirement for per-sample gradients in DP-SGD.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedmpt.errors import ConfigError

__all__ = [
    "ConditionTransport",
    "ConditionTransportOutput",
    "SinkhornConfig",
    "SinkhornResult",
    "sinkhorn_log",
]

logger = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class SinkhornConfig:
    """Settings of the log-domain Sinkhorn solver.

    Attributes:
        epsilon: entropic regularisation ``eps > 0`` of ``min_P <P, K> - eps * H(P)``. Default 0.1, the value
            the authors' related OT code (their Fed-RAM baseline and the OT branch of their later revision)
            uses on costs in ``[0, 2]``; smaller values give sharper plans and need more iterations.
        max_iter: iteration cap, ``>= 1``. Default 100 (the authors' cap).
        tol: a problem has converged once the L1 error of its row marginal, ``sum_m |sum_c P_mc - a_m|``, is
            ``<= tol`` (the column marginal is exact after every iteration). Default 1e-3 (the authors'
            threshold, which they apply to the change of the scaling vector instead).
        check_every: the convergence test runs every ``check_every`` iterations (and after the last one). Each
            test synchronises with the device, so on a GPU checking every iteration is wasteful.
        fixed_iterations: run exactly ``max_iter`` iterations with no data-dependent stopping. Required under
            ``torch.func.vmap`` (which cannot branch on tensor values); ``converged`` and ``marginal_error``
            are still reported after the last iteration.
    """

    epsilon: float = 0.1
    max_iter: int = 100
    tol: float = 1e-3
    check_every: int = 10
    fixed_iterations: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, int | float):
            raise ConfigError(f"SinkhornConfig.epsilon must be a number, got {self.epsilon!r}")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(f"SinkhornConfig.epsilon must be finite and > 0, got {self.epsilon!r}")
        for name in ("max_iter", "check_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"SinkhornConfig.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, int | float):
            raise ConfigError(f"SinkhornConfig.tol must be a number, got {self.tol!r}")
        if not (math.isfinite(self.tol) and self.tol >= 0):
            raise ConfigError(f"SinkhornConfig.tol must be finite and >= 0, got {self.tol!r}")
        if not isinstance(self.fixed_iterations, bool):
            raise ConfigError(f"SinkhornConfig.fixed_iterations must be a bool, got {self.fixed_iterations!r}")


class SinkhornResult(NamedTuple):
    """Output of :func:`sinkhorn_log` for a batch of problems with batch shape ``(...)``.

    Attributes:
        plan: the transport plan ``P``, shape ``(..., M, C)``; its column sums equal ``b`` to rounding.
        iterations: iterations each problem ran, ``(...)`` int64.
        converged: per problem, whether ``marginal_error <= tol`` after the last iteration it ran, ``(...)``
        bool. marginal_error: per problem, ``sum_m |sum_c P_mc - a_m|``, ``(...)``.
        transport_cost: per problem, ``<P, K> = sum_mc P_mc K_mc`` with the cost ``K`` given, ``(...)``.
    """

    plan: Tensor
    iterations: Tensor
    converged: Tensor
    marginal_error: Tensor
    transport_cost: Tensor


def _safe_log(x: Tensor) -> Tensor:
    """``log(x)`` with ``log(0) = -inf`` and a zero (not NaN) gradient at ``x = 0``."""
    positive = x > 0
    return torch.where(positive, torch.log(torch.where(positive, x, torch.ones_like(x))), -math.inf)


def _check_inputs(cost: Tensor, a: Tensor, b: Tensor) -> None:
    """Raise on shapes, dtypes or values that are not a transport problem (data-dependent: not under vmap)."""
    if cost.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"sinkhorn_log: cost must be float32 or float64, got {cost.dtype}")
    if cost.dim() < 2:
        raise ValueError(f"sinkhorn_log: cost must have shape (..., M, C), got {tuple(cost.shape)}")
    num_rows, num_cols = cost.shape[-2:]
    if num_rows == 0 or num_cols == 0:
        raise ValueError(f"sinkhorn_log: cost must have M >= 1 rows and C >= 1 columns, got {tuple(cost.shape)}")
    if a.shape != cost.shape[:-1]:
        raise ValueError(
            f"sinkhorn_log: a must have shape {tuple(cost.shape[:-1])} (cost without its last axis), "
            f"got {tuple(a.shape)}"
        )
    if b.shape[-1:] != (num_cols,) or b.dim() > cost.dim() - 1:
        raise ValueError(f"sinkhorn_log: b must have shape (C,) or (..., C) with C={num_cols}, got {tuple(b.shape)}")
    try:
        torch.broadcast_shapes(b.shape, cost.shape[:-2] + (num_cols,))
    except RuntimeError as err:
        raise ValueError(
            f"sinkhorn_log: b of shape {tuple(b.shape)} does not broadcast to {tuple(cost.shape[:-2])} + (C,)"
        ) from err


def _check_values(cost: Tensor, a: Tensor, b: Tensor) -> None:
    """Raise on non-finite costs, negative masses or unequal total masses."""
    cost, a, b = cost.detach(), a.detach(), b.detach()
    if not bool(torch.isfinite(cost).all()):
        raise ValueError("sinkhorn_log: cost contains NaN or infinite entries")
    for name, marginal in (("a", a), ("b", b)):
        if not bool(torch.isfinite(marginal).all()) or bool((marginal < 0).any()):
            raise ValueError(f"sinkhorn_log: marginal {name} must be finite and >= 0")
    mass_a = a.sum(-1)
    mass_b = b.sum(-1).expand_as(mass_a)
    if bool((mass_a <= 0).any()):
        raise ValueError("sinkhorn_log: marginal a has a problem with zero total mass")
    tolerance = 1e-4 if cost.dtype == torch.float32 else 1e-9
    gap = (mass_a - mass_b).abs().max()
    if float(gap) > tolerance * float(mass_a.abs().max()):
        raise ValueError(f"sinkhorn_log: a and b must have equal total mass, largest gap is {float(gap):.3g}")


def _row_error(log_u: Tensor, log_v: Tensor, scaled_cost: Tensor, a: Tensor) -> Tensor:
    """``sum_m |sum_c P_mc - a_m|`` for ``P = exp(log_u_m + log_v_c - scaled_cost_mc)``."""
    log_rows = log_u + torch.logsumexp(log_v.unsqueeze(-2) - scaled_cost, dim=-1)  # (..., M)
    return (torch.exp(log_rows) - a).abs().sum(-1)


def sinkhorn_log(
    cost: Tensor,
    a: Tensor,
    b: Tensor,
    config: SinkhornConfig | None = None,
    *,
    validate: bool = True,
) -> SinkhornResult:
    """Solve a batch of entropic OT problems with log-domain Sinkhorn iterations.

    For every problem (leading dims of ``cost``) this returns the minimiser of
    ``<P, K> - eps * H(P)`` with ``H(P) = -sum P (log P - 1)`` over plans with ``P 1 = a`` and ``P^T 1 = b``,
    the problem POT's ``ot.sinkhorn(a, b, K, reg=eps)`` solves. With log-scalings ``u, v`` the iterations are

        u_m = log a_m - logsumexp_c(v_c - K'_mc / eps),   v_c = log b_c - logsumexp_m(u_m - K'_mc / eps),

    and ``P_mc = exp(u_m + v_c - K'_mc / eps)``. ``K' = K - min_c K_mc`` (per row): a row shift of the cost is
    absorbed by ``u`` and leaves the plan unchanged, and it keeps huge costs from overflowing. Everything
    stays in the log domain, so zero-mass rows (``a_m = 0`` gives ``u_m = -inf`` and a zero plan row), huge
    costs and tiny ``eps`` give no NaN or inf; an unconverged problem is reported through ``converged``, never
    raised.

    Early stopping is per problem: a problem whose row-marginal error is ``<= tol`` at a check stops updating,
    so its result does not depend on the other problems in the batch. With ``config.fixed_iterations`` every
    problem runs ``max_iter`` iterations (the form ``torch.func.vmap`` accepts).

    Gradients flow through the unrolled iterations if the inputs require them (memory grows with the iteration
    count); callers that want a detached plan pass detached inputs, as :class:`ConditionTransport` does.

    Args:
        cost: ``(..., M, C)`` cost matrices, float32 or float64, finite.
        a: ``(..., M)`` row marginals, ``>= 0``.
        b: ``(C,)`` or broadcastable ``(..., C)`` column marginals, ``>= 0``, same total mass as ``a``.
        config: solver settings; :class:`SinkhornConfig` defaults if ``None``.
        validate: check shapes and values (finite cost, non-negative marginals, equal masses). Value checks
            branch on tensor data, so pass ``False`` under ``torch.func.vmap``; shapes are checked regardless.

    Returns:
        A :class:`SinkhornResult` with the plan and per-problem iterations, convergence flag, L1 row-marginal
        error and transport cost ``<P, K>``.

    Raises:
        TypeError: ``cost`` is not float32/float64.
        ValueError: shapes do not form a transport problem, or (with ``validate``) invalid values.
    """
    config = SinkhornConfig() if config is None else config
    _check_inputs(cost, a, b)
    a = a.to(cost.dtype)
    b = b.to(cost.dtype)
    if validate:
        _check_values(cost, a, b)

    batch_shape = cost.shape[:-2]
    num_cols = cost.shape[-1]
    b = b.expand(*batch_shape, num_cols)
    log_a = _safe_log(a)  # (..., M)
    log_b = _safe_log(b)  # (..., C)
    scaled_cost = (cost - cost.amin(dim=-1, keepdim=True)) / config.epsilon  # (..., M, C)

    log_u = torch.zeros_like(log_a)
    log_v = torch.zeros_like(log_b)
    if config.fixed_iterations:
        for _ in range(config.max_iter):
            log_u = log_a - torch.logsumexp(log_v.unsqueeze(-2) - scaled_cost, dim=-1)
            log_v = log_b - torch.logsumexp(log_u.unsqueeze(-1) - scaled_cost, dim=-2)
        iterations = torch.full(batch_shape, config.max_iter, dtype=torch.int64, device=cost.device)
    else:
        active = torch.ones(batch_shape, dtype=torch.bool, device=cost.device)
        iterations = torch.zeros(batch_shape, dtype=torch.int64, device=cost.device)
        for step in range(1, config.max_iter + 1):
            new_u = log_a - torch.logsumexp(log_v.unsqueeze(-2) - scaled_cost, dim=-1)
            new_v = log_b - torch.logsumexp(new_u.unsqueeze(-1) - scaled_cost, dim=-2)
            log_u = torch.where(active.unsqueeze(-1), new_u, log_u)
            log_v = torch.where(active.unsqueeze(-1), new_v, log_v)
            iterations = iterations + active.to(torch.int64)
            if step % config.check_every == 0 or step == config.max_iter:
                active = active & (_row_error(log_u, log_v, scaled_cost, a) > config.tol)
                if not bool(active.any()):
                    break
        if bool(active.any()):
            logger.debug(
                "sinkhorn_log: %d of %d problems reached max_iter=%d without tol=%g",
                int(active.sum()),
                active.numel(),
                config.max_iter,
                config.tol,
            )

    marginal_error = _row_error(log_u, log_v, scaled_cost, a)
    plan = torch.exp(log_u.unsqueeze(-1) + log_v.unsqueeze(-2) - scaled_cost)  # (..., M, C)
    return SinkhornResult(
        plan=plan,
        iterations=iterations,
        converged=marginal_error <= config.tol,
        marginal_error=marginal_error,
        transport_cost=(plan * cost).sum(dim=(-2, -1)),
    )


class ConditionTransportOutput(NamedTuple):
    """Output of :class:`ConditionTransport` for B images, N conditions, M patches, C classes.

    Attributes:
        logits: ``(B, N, C)`` condition-specific class logits, ``logit_scale * scores + logit_bias``.
        scores: ``(B, N, C)`` transported similarity ``psi`` in ``[-1, 1]``.
        plan: ``(B, N, M, C)`` transport plans (detached unless ``differentiable_plan``).
        solver: the :class:`SinkhornResult` (iterations, convergence, marginal error per (image, condition)),
            or ``None`` when the caller supplied the plan.
    """

    logits: Tensor
    scores: Tensor
    plan: Tensor
    solver: SinkhornResult | None


class ConditionTransport(nn.Module):
    """FedMPT's condition-guided OT between image patches and condition-specific class prompts.

    For image ``b`` and condition ``n`` with adapted patch features ``x_m = f_n(v_m)`` and class prompt
    features ``t_c = f_t(p_{n,c})`` (both L2-normalised over the feature axis):

        S_mc = <x_m, t_c>                         cosine similarity, in [-1, 1]
        K_mc = 1 - S_mc                           transport cost, in [0, 2]
        a_m  = softmax_m(max_c S_mc / tau_a)      patch importance (row marginal)
        b_c  = 1 / C                              every class gets equal mass (column marginal)
        P    = Sinkhorn(K; a, b, eps)
        psi_c = C * sum_m P_mc S_mc               in [-1, 1]
        logit_c = logit_scale * psi_c + logit_bias

    The column of ``P`` for class ``c`` has mass ``1/C``, so ``C * P[:, c]`` is a distribution over patches
    and ``psi_c`` is a transport-weighted mean cosine, bounded like a CLIP cosine. The fixed ``logit_scale``
    (20, the region-similarity scale of DualCoOp and of the authors' code) maps it to logit range, and one
    learnable scalar ``logit_bias`` sets the operating point of the sigmoid (multi-label scores are not a
    softmax over classes, so the absolute level matters). The map is affine and shared across conditions, so
    gating conditions after it equals gating ``psi`` and mapping once.

    By default the plan is detached (computed on detached cost and marginals, like the authors' OT code):
    gradients reach the features only through ``S`` in ``psi``, memory does not grow with the iteration count,
    and the row marginal ``a`` gets no gradient. ``differentiable_plan=True`` backpropagates through the
    unrolled iterations instead. Under ``torch.func.vmap`` use a ``SinkhornConfig(fixed_iterations=True)``.

    Args:
        sinkhorn: solver settings (default :class:`SinkhornConfig()`: eps 0.1, 100 iterations, tol 1e-3).
        row_temperature: ``tau_a > 0`` of the patch-importance softmax on cosines. Default 0.2: the paper's
            ``tau = 4`` applied to the authors' 20x-scaled similarities (``20 cos / 4 = cos / 0.2``).
        differentiable_plan: backpropagate through the Sinkhorn iterations.
        logit_scale: fixed positive multiplier of ``psi``.
        logit_bias_init: initial value of the learnable bias. Default -5: CLIP ViT-B/16 patch-text cosines sit
            around 0.2-0.3, so ``20 * 0.25 - 5 = 0`` starts the logits near the sigmoid's midpoint.
    """

    def __init__(
        self,
        *,
        sinkhorn: SinkhornConfig | None = None,
        row_temperature: float = 0.2,
        differentiable_plan: bool = False,
        logit_scale: float = 20.0,
        logit_bias_init: float = -5.0,
    ) -> None:
        super().__init__()
        if not (isinstance(row_temperature, int | float) and math.isfinite(row_temperature) and row_temperature > 0):
            raise ConfigError(f"ConditionTransport.row_temperature must be finite and > 0, got {row_temperature!r}")
        if not (isinstance(logit_scale, int | float) and math.isfinite(logit_scale) and logit_scale > 0):
            raise ConfigError(f"ConditionTransport.logit_scale must be finite and > 0, got {logit_scale!r}")
        if not (isinstance(logit_bias_init, int | float) and math.isfinite(logit_bias_init)):
            raise ConfigError(f"ConditionTransport.logit_bias_init must be finite, got {logit_bias_init!r}")
        if not isinstance(differentiable_plan, bool):
            raise ConfigError(f"ConditionTransport.differentiable_plan must be a bool, got {differentiable_plan!r}")
        self.sinkhorn = SinkhornConfig() if sinkhorn is None else sinkhorn
        self.row_temperature = float(row_temperature)
        self.differentiable_plan = differentiable_plan
        self.logit_scale = float(logit_scale)
        # shape (1,), not 0-d: Flower array records do not round-trip 0-d arrays
        self.logit_bias = nn.Parameter(torch.full((1,), float(logit_bias_init)))

    def extra_repr(self) -> str:
        return (
            f"sinkhorn={self.sinkhorn}, row_temperature={self.row_temperature}, "
            f"differentiable_plan={self.differentiable_plan}, logit_scale={self.logit_scale}"
        )

    def forward(
        self, patch_features: Tensor, class_features: Tensor, plan: Tensor | None = None
    ) -> ConditionTransportOutput:
        """Score every class under every condition by transported similarity.

        Args:
            patch_features: ``(B, N, M, D)`` condition-adapted patch features.
            class_features: ``(N, C, D)`` condition-class prompt features (shared by the batch) or
                ``(B, N, C, D)``.
            plan: ``(B, N, M, C)`` plans solved beforehand for these same features (see :meth:`solve_plan`),
                used instead of solving here. Only for a detached plan (``differentiable_plan=False``), whose
                value is all the scores need: DP-SGD solves the plans of a batch once, outside ``torch.func.vmap``
                and with per-problem early stopping, then computes per-sample gradients through ``S`` alone.

        Returns:
            :class:`ConditionTransportOutput` with logits and scores ``(B, N, C)``, in float32 when the
            features are float16/bfloat16 (the transport is always solved in float32 or float64).

        Raises:
            ValueError: the shapes do not match, or a plan is given with ``differentiable_plan=True``.
        """
        if patch_features.dim() != 4:
            raise ValueError(
                f"ConditionTransport: patch_features must have shape (B, N, M, D), got {tuple(patch_features.shape)}"
            )
        batch, conditions, _, dim = patch_features.shape
        if (
            class_features.dim() not in (3, 4)
            or class_features.shape[-1] != dim
            or class_features.shape[-3] != conditions
        ):
            raise ValueError(
                f"ConditionTransport: class_features must have shape (N={conditions}, C, D={dim}) or "
                f"(B, N, C, D), got {tuple(class_features.shape)}"
            )
        if class_features.dim() == 4 and class_features.shape[0] != batch:
            raise ValueError(
                f"ConditionTransport: class_features batch {class_features.shape[0]} != patch_features batch {batch}"
            )
        num_classes = class_features.shape[-2]

        patches = F.normalize(patch_features, dim=-1)  # (B, N, M, D)
        classes = F.normalize(class_features, dim=-1)  # (N, C, D) or (B, N, C, D)
        similarity = torch.matmul(patches, classes.transpose(-2, -1))  # (B, N, M, C)
        if similarity.dtype not in _SUPPORTED_DTYPES:
            # half-precision logsumexp over 1/eps-scaled costs loses the plan; solve and score in float32
            similarity = similarity.float()
        cost = 1.0 - similarity
        row_marginal = torch.softmax(similarity.amax(dim=-1) / self.row_temperature, dim=-1)  # (B, N, M)
        col_marginal = torch.full((num_classes,), 1.0 / num_classes, dtype=cost.dtype, device=cost.device)

        solver: SinkhornResult | None = None
        if plan is not None:
            if self.differentiable_plan:
                raise ValueError("ConditionTransport: a precomputed plan cannot carry gradients (differentiable_plan)")
            if plan.shape != similarity.shape:
                raise ValueError(
                    f"ConditionTransport: plan must have shape {tuple(similarity.shape)}, got {tuple(plan.shape)}"
                )
            plan = plan.detach().to(similarity.dtype)
        elif self.differentiable_plan:
            solver = sinkhorn_log(cost, row_marginal, col_marginal, self.sinkhorn, validate=False)
            plan = solver.plan
        else:
            with torch.no_grad():
                solver = sinkhorn_log(cost.detach(), row_marginal.detach(), col_marginal, self.sinkhorn, validate=False)
            plan = solver.plan  # (B, N, M, C)
        scores = num_classes * (plan * similarity).sum(dim=-2)  # (B, N, C)
        logits = self.logit_scale * scores + self.logit_bias
        return ConditionTransportOutput(logits=logits, scores=scores, plan=plan, solver=solver)

    @torch.no_grad()
    def solve_plan(self, patch_features: Tensor, class_features: Tensor) -> Tensor:
        """The detached plans ``(B, N, M, C)`` that :meth:`forward` would use, solved with this module's
        Sinkhorn settings but always with per-problem early stopping (``fixed_iterations`` ignored), so each
        plan depends on its own image only. Not for use under ``torch.func.vmap``."""
        config = replace(self.sinkhorn, fixed_iterations=False)
        saved, self.sinkhorn = self.sinkhorn, config
        try:
            return self.forward(patch_features, class_features).plan
        finally:
            self.sinkhorn = saved
