"""The method interface shared by FedMPT, its ablations and the baselines, and the registry that names them.

A method is an ``nn.Module`` over *frozen image features*: the global feature ``(B, D)`` and the patch
features ``(B, M, D)`` that the frozen CLIP image encoder produced (cached once, see
:mod:`fedmpt.feature_cache`). Every method scores classes from them and its own text features; the only
trainable tensors are the method's own (prompt vectors, adapters, gate, biases), which are what FedAvg
averages. One training loop (:mod:`fedmpt.training`) serves every method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from fedmpt.backbone.loader import Backbone
from fedmpt.errors import ConfigError

#: Values of :attr:`MethodConfig.train_groups`.
TRAIN_GROUPS = ("all", "prompts")


@dataclass(frozen=True)
class MethodConfig:
    """Hyperparameters of the methods (each method reads the ones it uses).

    Defaults follow the FedMPT paper where it gives a value: ``n_condition_context = n_class_context = 4``
    (beta_cond = beta_cls = 4), ``adapter_rank = 32`` (D_s = 32), ``tau = 4`` expressed on cosines as
    ``row_temperature = 0.2`` (the authors scale cosines by 20 before dividing by tau: 20 cos / 4 = cos / 0.2).
    ``logit_scale = 20`` is DualCoOp's and the authors' region-similarity scale. ``context_init`` is CoOp's
    ``ctx_init``: PromptFL's context vectors start as the token embeddings of this text (its length sets the
    context length) and the class text keeps its article, so PromptFL starts exactly at the zero-shot prompt
    ``"a photo of {a|an} {class}."`` (mAP is rank-based, so the logit scale and bias do not move it); ``""``
    draws ``n_context`` random vectors. ``train_groups = "prompts"`` trains only the prompt vectors and logit
    biases and leaves every other part at its initialisation (FedMPT's adapters the identity, its gate uniform):
    the DP default (``dp-train``), because isotropic DP noise breaks the adapters' low-rank products.
    """

    n_condition_context: int = 4
    n_class_context: int = 4
    n_context: int = 16  # CoOp / PromptFL (when context_init = "") and DualCoOp context length
    context_init: str = "a photo of"
    train_groups: str = "all"  # "all", or "prompts": only prompt vectors and logit biases are trained
    adapter_rank: int = 32
    gate_rank: int = 32
    row_temperature: float = 0.2
    logit_scale: float = 20.0
    logit_bias_init: float = -5.0
    sinkhorn_epsilon: float = 0.1
    sinkhorn_iterations: int = 100
    sinkhorn_tol: float = 1e-3
    differentiable_plan: bool = False
    init_seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"MethodConfig.{f.name} must be an integer, got {value!r}")
        for name in ("n_condition_context", "n_class_context"):
            if getattr(self, name) < 0:
                raise ConfigError(f"MethodConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("n_context", "adapter_rank", "gate_rank", "sinkhorn_iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"MethodConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.train_groups not in TRAIN_GROUPS:
            raise ConfigError(f"MethodConfig.train_groups must be one of {TRAIN_GROUPS}, got {self.train_groups!r}")
        for name in ("row_temperature", "logit_scale", "sinkhorn_epsilon"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"MethodConfig.{name} must be a finite number > 0, got {value!r}")


class Method(nn.Module):
    """Base class: ``forward(global, patches) -> logits (B, C)`` over frozen image features.

    Subclasses implement :meth:`text_features` (the class-side features, recomputed from trainable prompts or
    fixed) and :meth:`logits`. Splitting the two lets evaluation encode the prompts once per pass, and lets the
    DP layer treat the text features as an intermediate of the computation.
    """

    name: str = "method"

    def __init__(self, backbone: Backbone, classnames: Sequence[str]) -> None:
        super().__init__()
        object.__setattr__(self, "_backbone", backbone)  # shared and frozen: not a submodule
        self.classnames = tuple(classnames)

    @property
    def backbone(self) -> Backbone:
        backbone: Backbone = self.__dict__["_backbone"]
        return backbone

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def text_features(self) -> Tensor:
        """Class-side features used by :meth:`logits` (shape is method-specific)."""
        raise NotImplementedError

    def logits(
        self, global_features: Tensor, patch_features: Tensor, text: Tensor, plans: Tensor | None = None
    ) -> Tensor:
        """Class logits (B, C) of a batch, given :meth:`text_features`.

        ``plans``: what :meth:`transport_plans` returned for this same batch, or ``None`` to solve any transport
        here. Methods without a transport ignore it.
        """
        raise NotImplementedError

    def transport_plans(self, global_features: Tensor, patch_features: Tensor, text: Tensor) -> Tensor | None:
        """Detached transport plans of a batch, one per row (leading axis ``B``), or ``None`` if the method has
        no detached transport. DP-SGD solves them once per batch, outside ``torch.func.vmap`` and with
        per-problem early stopping, and passes them back to :meth:`logits` inside the per-sample ``vmap``."""
        return None

    def forward(self, global_features: Tensor, patch_features: Tensor) -> Tensor:
        return self.logits(global_features, patch_features, self.text_features())

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters training changes and FedAvg averages, by name."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def trainable_state(self) -> dict[str, Tensor]:
        """A detached fp32 copy of the trainable parameters."""
        return {n: p.detach().to(torch.float32).clone() for n, p in self.trainable_parameters().items()}

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        """Copy ``state`` into the trainable parameters; names and shapes must match exactly."""
        params = self.trainable_parameters()
        if set(state) != set(params):
            raise ConfigError(
                f"{self.name}: state has tensors {sorted(set(state) - set(params))} that the model lacks and "
                f"lacks {sorted(set(params) - set(state))}"
            )
        with torch.no_grad():
            for n, p in params.items():
                value = torch.as_tensor(state[n])
                if value.shape != p.shape:
                    raise ConfigError(f"{self.name}: {n} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
                p.copy_(value.to(p.dtype))

    def num_trainable(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.trainable_parameters().values())


MethodFactory = Callable[[Backbone, Sequence[str], Sequence[str], MethodConfig], Method]
METHODS: dict[str, MethodFactory] = {}


def register_method(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Register a method factory ``(backbone, classnames, conditions, config) -> Method`` under ``name``."""

    def decorator(factory: MethodFactory) -> MethodFactory:
        if name in METHODS and METHODS[name] is not factory:
            raise ConfigError(f"method {name!r} is already registered")
        METHODS[name] = factory
        return factory

    return decorator


def build_method(
    name: str,
    backbone: Backbone,
    classnames: Sequence[str],
    conditions: Sequence[str] = (),
    config: MethodConfig | None = None,
    **overrides: Any,
) -> Method:
    """Build the method registered as ``name`` (see :data:`METHODS`)."""
    import fedmpt.methods  # noqa: F401 - registers the built-in methods

    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    cfg = config or MethodConfig(**overrides)
    method = METHODS[name](backbone, classnames, conditions, cfg)
    method.name = name
    if cfg.train_groups == "prompts":
        for pname, param in method.named_parameters():
            if not is_prompt_parameter(pname):
                param.requires_grad_(False)
    return method


def is_prompt_parameter(name: str) -> bool:
    """Whether a parameter is trained under ``train_groups = "prompts"``: prompt vectors and logit biases."""
    return name.startswith("prompts.") or name.split(".")[-1] == "logit_bias"
