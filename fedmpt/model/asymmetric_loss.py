"""Asymmetric loss (ASL) for multi-label recognition, reduced per sample, with unknown labels ignored.

FedMPT (CVPR 2026, "Loss & Training") trains with the asymmetric loss of Ridnik et al. (ICCV 2021, "Asymmetric
Loss For Multi-Label Classification"). With ``p = sigmoid(x)`` for a logit ``x``, the shifted probability
``p_m = max(p - m, 0)`` (probability margin ``m``, called ``clip``) and a target ``y``:

    L+ = -(1 - p)^gamma_pos * log(p)               if y = 1
    L- = -p_m^gamma_neg     * log(1 - p_m)         if y = 0
    0                                              if y = -1 (unknown, partial-label benchmark)

``gamma_neg >= gamma_pos`` down-weights the many easy negatives of multi-label data, and the margin discards
negatives with ``p <= m`` altogether. The loss is summed over the known labels of each sample, so a sample's
loss depends on that sample's logits and targets only: what per-sample gradient clipping (DP-SGD) needs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedmpt.errors import ConfigError

__all__ = ["UNKNOWN_LABEL", "asymmetric_loss"]

UNKNOWN_LABEL = -1
"""Target value of a label that is not annotated; it contributes zero loss and zero gradient."""


def _check_number(name: str, value: object, *, low: float, high: float, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"asymmetric_loss: {name} must be a finite number, got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ConfigError(f"asymmetric_loss: {name} must lie in {left}{low}, {high}{right}, got {value!r}")
    return float(value)


def _focal_weight(base: Tensor, gamma: float) -> Tensor:
    """``base ** gamma`` for ``base >= 0`` with ``0 ** gamma`` (gamma > 0) = 0 and a finite gradient there."""
    if gamma == 0.0:
        return torch.ones_like(base)
    positive = base > 0
    safe_base = torch.where(positive, base, torch.ones_like(base))
    return torch.where(positive, safe_base.pow(gamma), torch.zeros_like(base))


def asymmetric_loss(
    logits: Tensor,
    targets: Tensor,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    *,
    detach_focal_weights: bool = False,
    check_targets: bool = True,
) -> Tensor:
    """Per-sample asymmetric loss, ``(B, C)`` logits and targets -> ``(B,)``.

    Implements the module docstring's ``L+``/``L-`` with ``log(q)`` evaluated as ``log(max(q, eps))`` (as in
    the ASL paper), so each term is at most ``-log(eps)`` and never infinite. Defaults are the ASL paper's
    recommendation (``gamma_pos=0, gamma_neg=4, clip=0.05``); the FedMPT authors' code runs ``gamma_pos=1,
    gamma_neg=2, clip=0.05``.

    Focal weights: by default gradients flow through ``(1 - p)^gamma_pos`` and ``p_m^gamma_neg``, so the
    gradient is the exact gradient of the loss above. ``detach_focal_weights=True`` treats them as constants
    (the ASL paper's optional ``disable_torch_grad_focal_loss``, which the FedMPT authors' code uses).

    Args:
        logits: ``(B, C)`` float logits.
        targets: ``(B, C)`` labels in ``{1, 0, -1}``; ``-1`` (:data:`UNKNOWN_LABEL`) marks an unknown label.
        gamma_pos: focusing exponent ``>= 0`` of positives.
        gamma_neg: focusing exponent ``>= 0`` of negatives.
        clip: probability margin ``m`` in ``[0, 1)`` applied to negatives.
        eps: floor in ``(0, 1)`` inside the logarithms.
        detach_focal_weights: see above.
        check_targets: verify that every target is -1, 0 or 1. The check branches on tensor values, so pass
            ``False`` under ``torch.func.vmap``; shapes are checked regardless.

    Returns:
        ``(B,)`` loss of each sample, summed over its known labels (0 for a sample with no known label).

    Raises:
        ConfigError: a hyper-parameter is out of range.
        ValueError: shapes differ or a target is not in ``{1, 0, -1}``.
        TypeError: ``logits`` is not floating point.
    """
    gamma_pos = _check_number("gamma_pos", gamma_pos, low=0.0, high=math.inf, low_open=False, high_open=True)
    gamma_neg = _check_number("gamma_neg", gamma_neg, low=0.0, high=math.inf, low_open=False, high_open=True)
    clip = _check_number("clip", clip, low=0.0, high=1.0, low_open=False, high_open=True)
    eps = _check_number("eps", eps, low=0.0, high=1.0, low_open=True, high_open=True)
    if not logits.is_floating_point():
        raise TypeError(f"asymmetric_loss: logits must be floating point, got {logits.dtype}")
    if logits.dim() != 2 or targets.shape != logits.shape:
        raise ValueError(
            "asymmetric_loss: logits and targets must both have shape (B, C), got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if check_targets:
        valid = (targets == 1) | (targets == 0) | (targets == UNKNOWN_LABEL)
        if not bool(valid.all()):
            bad = targets[~valid].flatten()[:5].tolist()
            raise ValueError(f"asymmetric_loss: targets must be 1, 0 or -1 (unknown), found {bad}")

    positive = targets == 1
    negative = targets == 0
    prob = torch.sigmoid(logits)  # (B, C)
    shifted = (prob - clip).clamp(min=0.0) if clip > 0 else prob  # p_m

    weight_pos = _focal_weight(1.0 - prob, gamma_pos)
    weight_neg = _focal_weight(shifted, gamma_neg)
    if detach_focal_weights:
        weight_pos = weight_pos.detach()
        weight_neg = weight_neg.detach()

    loss_pos = -weight_pos * torch.log(prob.clamp(min=eps))
    loss_neg = -weight_neg * torch.log((1.0 - shifted).clamp(min=eps))
    zero = torch.zeros_like(logits)
    elementwise = torch.where(positive, loss_pos, torch.where(negative, loss_neg, zero))  # (B, C)
    return elementwise.sum(dim=-1)
