"""Per-condition low-rank adapters: FedMPT's condition-specific views of the frozen CLIP patch features.

FedMPT (CVPR 2026, "Condition-Guided Optimal Transport") maps the patch-level visual features ``f_v(v)`` of an
image into one latent space per condition with a LoRA-style low-rank map,
``f_n(v) = W_up,n W_down,n f_v(v)``, before aligning the patches with the condition's class prompts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fedmpt.errors import ConfigError, check_positive_int

__all__ = ["ConditionAdapters"]


class ConditionAdapters(nn.Module):
    """N independent low-rank adapters applied to patch features at once.

    For condition ``n`` and a patch feature ``x`` (a row vector of width D):

        f_n(x) = x + x W_down,n W_up,n        (residual=True, the default)
        f_n(x) = x W_down,n W_up,n            (residual=False)

    with ``W_down,n`` of shape ``(D, r)`` and ``W_up,n`` of shape ``(r, D)``. The N maps are stored stacked,
    ``down`` ``(N, D, r)`` and ``up`` ``(N, r, D)``, and applied with two einsums, so there is no Python loop
    over conditions.

    Initialisation. ``down`` is Kaiming-uniform (bound ``1/sqrt(D)``), drawn from ``generator`` when given.
    With ``residual=True`` ``up`` is zero, so every ``f_n`` is the identity at initialisation: the adapted
    features are exactly CLIP's, which keeps the frozen image-text alignment that the transport cost
    ``1 - cos(f_n(x), t)`` relies on, and training starts from zero-shot CLIP rather than from a random
    projection. With ``residual=False`` a rank-``r`` map cannot be the identity; ``up`` is then initialised to
    ``down^T`` after orthonormalising ``down``'s columns, so ``f_n`` starts as the orthogonal projection onto
    a random r-dimensional subspace (cosines are preserved only approximately). The paper leaves the choice
    open; the residual form is recommended.

    Per-sample gradients. Each output row depends only on its own input row, with no batch statistics, so
    ``torch.func.vmap(torch.func.grad(...))`` gives exact per-sample gradients. Opacus's hook-based grad
    samplers know only standard layers; for this module Opacus's ``GradSampleModule`` falls back to its
    functorch sampler, which handles the stacked parameters (both paths are tested).

    Args:
        dim: feature width D of the patch features.
        num_conditions: number of conditions N.
        rank: adapter rank r (paper: D_s = 32).
        residual: add the input back (see above).
        generator: RNG for the initialisation; ``None`` uses torch's default generator.
    """

    def __init__(
        self,
        dim: int,
        num_conditions: int,
        rank: int = 32,
        *,
        residual: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("ConditionAdapters", "dim", dim)
        self.num_conditions = check_positive_int("ConditionAdapters", "num_conditions", num_conditions)
        self.rank = check_positive_int("ConditionAdapters", "rank", rank)
        if rank > dim:
            raise ConfigError(f"ConditionAdapters.rank must be <= dim={dim}, got {rank!r}")
        if not isinstance(residual, bool):
            raise ConfigError(f"ConditionAdapters.residual must be a bool, got {residual!r}")
        self.residual = residual

        bound = 1.0 / math.sqrt(dim)
        down = (torch.rand(num_conditions, dim, rank, generator=generator) * 2.0 - 1.0) * bound  # (N, D, r)
        if residual:
            up = torch.zeros(num_conditions, rank, dim)  # (N, r, D)
        else:
            down, _ = torch.linalg.qr(down)  # orthonormal columns, (N, D, r)
            up = down.transpose(-2, -1).clone()  # (N, r, D)
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(up)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_conditions={self.num_conditions}, rank={self.rank}, residual={self.residual}"

    def forward(self, patch_features: Tensor) -> Tensor:
        """Map ``(B, M, D)`` patch features to ``(B, N, M, D)`` condition-specific features.

        Raises:
            ValueError: the input is not ``(B, M, D)`` with ``D == dim``.
        """
        if patch_features.dim() != 3 or patch_features.shape[-1] != self.dim:
            raise ValueError(
                f"ConditionAdapters: patch_features must have shape (B, M, D={self.dim}), "
                f"got {tuple(patch_features.shape)}"
            )
        hidden = torch.einsum("bmd,ndr->bnmr", patch_features, self.down)  # (B, N, M, r)
        update = torch.einsum("bnmr,nrd->bnmd", hidden, self.up)  # (B, N, M, D)
        if self.residual:
            return patch_features.unsqueeze(1) + update
        return update
