"""Class-specific region aggregation: a softmax-weighted mean of patch-class similarities (DualCoOp).

For patch features ``x_m`` and class features ``t_c`` (L2-normalised):

    S_mc  = <x_m, t_c>
    w_mc  = softmax_m(S_mc / tau)
    psi_c = sum_m w_mc S_mc                 in [-1, 1]

Each class attends to the patches most similar to it. FedMPT's ablations without optimal transport and
Fed-DualCoOp score classes this way; with ``tau = 0.2`` it equals the authors' code (``20 cos / tau'`` with
``tau' = 4``). Every image is processed independently (no batch statistics).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def region_similarity(patch_features: Tensor, class_features: Tensor) -> Tensor:
    """Cosine similarities ``(..., M, C)`` of patches ``(..., M, D)`` and classes ``(..., C, D)``."""
    return torch.matmul(F.normalize(patch_features, dim=-1), F.normalize(class_features, dim=-1).transpose(-2, -1))


def region_pool(similarity: Tensor, temperature: float, weights_from: Tensor | None = None) -> Tensor:
    """``psi_c = sum_m softmax_m(W_mc / tau) S_mc`` over the patch axis (-2): ``(..., M, C) -> (..., C)``.

    ``weights_from`` (default: ``similarity`` itself) gives the map ``W`` the spatial weights are computed
    from; DualCoOp weights the negative-prompt map by the positive one.
    """
    if temperature <= 0:
        raise ValueError(f"region pooling temperature must be > 0, got {temperature}")
    source = similarity if weights_from is None else weights_from
    weights = torch.softmax(source / temperature, dim=-2)
    return (weights * similarity).sum(dim=-2)
