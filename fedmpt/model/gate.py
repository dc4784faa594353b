"""Conditional gating: FedMPT's image-adaptive weighting of the N condition-specific predictions.

FedMPT (CVPR 2026, "Conditional Gating") routes each image to the conditions that fit it, MoE-style: a
low-rank router ``omega = Omega(f_v(v))`` on the global image feature gives one logit per condition, and the
final prediction is ``P' = sum_n softmax(omega)_n P_n``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedmpt.errors import ConfigError, check_positive_int

__all__ = ["ConditionGate", "combine_conditions"]


class ConditionGate(nn.Module):
    """Low-rank router from the global image feature to softmax weights over conditions.

    For a global image feature ``z`` (width D), L2-normalised first when ``normalize_input``:

        omega = up(down(z)) = W_up (W_down z) + c        shape (N,)
        w     = softmax(omega)                            on the probability simplex

    ``down`` is ``nn.Linear(D, r, bias=False)`` and ``up`` is ``nn.Linear(r, N)``: standard layers on
    batch-first input, so Opacus's hook-based per-sample gradients apply as well as ``torch.func``. The router
    is linear (the paper describes Omega as a LoRA module); no auxiliary load-balancing loss is used, since
    such a loss couples the samples of a batch and would break per-sample DP accounting.

    Initialisation: ``down`` Kaiming-uniform (from ``generator`` when given), ``up`` weight and bias zero.
    Then ``omega = 0`` for every image and the initial gate is uniform, ``w_n = 1/N``: training starts from
    the plain average of the conditions, and ``up`` gets a non-zero gradient from the first step (``down``
    follows once ``up`` is non-zero, as in LoRA).

    Note that the router has ``D r + r N + N`` parameters; for ``r >= N`` a full ``nn.Linear(D, N)`` would be
    smaller. ``rank`` defaults to 32 to follow the paper's LoRA dimension D_s.

    Args:
        dim: width D of the global image feature.
        num_conditions: number of conditions N.
        rank: router rank r.
        normalize_input: L2-normalise the input feature (routing then ignores its norm).
        generator: RNG for the initialisation; ``None`` uses torch's default generator.
    """

    def __init__(
        self,
        dim: int,
        num_conditions: int,
        rank: int = 32,
        *,
        normalize_input: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("ConditionGate", "dim", dim)
        self.num_conditions = check_positive_int("ConditionGate", "num_conditions", num_conditions)
        self.rank = check_positive_int("ConditionGate", "rank", rank)
        if not isinstance(normalize_input, bool):
            raise ConfigError(f"ConditionGate.normalize_input must be a bool, got {normalize_input!r}")
        self.normalize_input = normalize_input
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, num_conditions)
        bound = 1.0 / math.sqrt(dim)
        with torch.no_grad():
            self.down.weight.copy_((torch.rand(rank, dim, generator=generator) * 2.0 - 1.0) * bound)
            self.up.weight.zero_()
            self.up.bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_conditions={self.num_conditions}, rank={self.rank}, "
            f"normalize_input={self.normalize_input}"
        )

    def router_logits(self, global_features: Tensor) -> Tensor:
        """Router logits ``omega``, ``(B, D) -> (B, N)``.

        Raises:
            ValueError: the input is not ``(B, D)`` with ``D == dim``.
        """
        if global_features.dim() != 2 or global_features.shape[-1] != self.dim:
            raise ValueError(
                f"ConditionGate: global_features must have shape (B, D={self.dim}), got {tuple(global_features.shape)}"
            )
        features = F.normalize(global_features, dim=-1) if self.normalize_input else global_features
        logits: Tensor = self.up(self.down(features))  # (B, N)
        return logits

    def forward(self, global_features: Tensor) -> Tensor:
        """Gate weights ``softmax(omega)``, ``(B, D) -> (B, N)``, each row on the probability simplex."""
        return torch.softmax(self.router_logits(global_features), dim=-1)


def combine_conditions(weights: Tensor, condition_scores: Tensor) -> Tensor:
    """Gate the condition-specific predictions: ``P'_bc = sum_n w_bn P_bnc``.

    Any per-condition affine map shared by all conditions (such as the logit scale and bias of
    :class:`fedmpt.model.sinkhorn.ConditionTransport`) commutes with this convex combination, so gating logits
    and gating scores then mapping give the same result.

    Args:
        weights: ``(B, N)`` gate weights (rows on the simplex).
        condition_scores: ``(B, N, C)`` per-condition scores or logits.

    Returns:
        ``(B, C)`` gated predictions.

    Raises:
        ValueError: the shapes do not match.
    """
    if weights.dim() != 2 or condition_scores.dim() != 3 or condition_scores.shape[:2] != weights.shape:
        raise ValueError(
            "combine_conditions: need weights (B, N) and condition_scores (B, N, C), got "
            f"{tuple(weights.shape)} and {tuple(condition_scores.shape)}"
        )
    return torch.einsum("bn,bnc->bc", weights, condition_scores)
