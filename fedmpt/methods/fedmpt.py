"""FedMPT (CVPR 2026) and the ablations of its Table 4, as one module with switches.

Full FedMPT, for B images, N conditions, C classes, M patches, width D:

    T_n,c  = f_t([V_n,1..V_n,bcond] [COND_n] [U_1..U_bcls] [CLASS_c])      (N, C, D) conditional prompts
    X_n,m  = f_n(v_m) = v_m + v_m W_down,n W_up,n                           (B, N, M, D) per-condition adapters
    P_n    = Sinkhorn(1 - S_n; a_n, 1/C),  S_n = cos(X_n, T_n)              (B, N, M, C) condition-guided OT
    psi_n  = C * sum_m P_n,mc S_n,mc                                        (B, N, C)
    logit_n = 20 * psi_n + beta                                             (B, N, C)
    w      = softmax(Omega(v_global))                                       (B, N) gate
    logits = sum_n w_n logit_n                                              (B, C)

Ablations (names as in the paper's Table 4):

* ``fedmpt-cps``: conditional prompts only; patches are not adapted, classes are scored by region pooling
  (softmax over patches, see :mod:`fedmpt.model.region_pooling`), conditions averaged uniformly.
* ``fedmpt-adapters``: per-condition adapters only; every adapter's patches are scored against the fixed
  hand-written prompts ``"a photo of a {class}."``, region pooling, uniform average.
* ``fedmpt-cps-adapters``: both, region pooling, uniform average.
* ``fedmpt-ot``: both, with optimal transport instead of region pooling, uniform average.
* ``fedmpt``: the full method (+ the gate).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedmpt.backbone.loader import Backbone
from fedmpt.errors import ConfigError
from fedmpt.methods.base import Method, MethodConfig, MethodFactory, register_method
from fedmpt.model.adapters import ConditionAdapters
from fedmpt.model.gate import ConditionGate, combine_conditions
from fedmpt.model.prompts import PromptBank, conditional_prompts
from fedmpt.model.region_pooling import region_pool, region_similarity
from fedmpt.model.sinkhorn import ConditionTransport, SinkhornConfig
from fedmpt.world.captions import class_prompt

VARIANTS = {
    # name: (conditional prompts, adapters, optimal transport, gate)
    "fedmpt-cps": (True, False, False, False),
    "fedmpt-adapters": (False, True, False, False),
    "fedmpt-cps-adapters": (True, True, False, False),
    "fedmpt-ot": (True, True, True, False),
    "fedmpt": (True, True, True, True),
}


class FedMPT(Method):
    """FedMPT with switches for its ablations (see the module docstring)."""

    prompts: PromptBank
    fixed_text: Tensor
    adapters: ConditionAdapters
    transport: ConditionTransport
    gate: ConditionGate

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        conditions: Sequence[str],
        config: MethodConfig,
        *,
        use_prompts: bool = True,
        use_adapters: bool = True,
        use_transport: bool = True,
        use_gate: bool = True,
    ) -> None:
        super().__init__(backbone, classnames)
        if not conditions:
            raise ConfigError("FedMPT needs at least one condition (see fedmpt.conditions)")
        self.conditions = tuple(conditions)
        self.config = config
        self.use_prompts, self.use_adapters = use_prompts, use_adapters
        self.use_transport, self.use_gate = use_transport, use_gate
        n, dim = len(self.conditions), backbone.embed_dim
        generator = torch.Generator().manual_seed(config.init_seed)
        if use_prompts:
            prompts, groups = conditional_prompts(
                self.conditions, self.classnames, config.n_condition_context, config.n_class_context
            )
            self.prompts = PromptBank(backbone, prompts, groups, generator=generator)
        else:
            with torch.no_grad():
                fixed = backbone.encode_text(backbone.tokenize([class_prompt(c) for c in self.classnames]))
            self.register_buffer("fixed_text", fixed.detach().clone())
        if use_adapters:
            self.adapters = ConditionAdapters(dim, n, rank=config.adapter_rank, generator=generator)
        if use_transport:
            self.transport = ConditionTransport(
                sinkhorn=SinkhornConfig(
                    epsilon=config.sinkhorn_epsilon,
                    max_iter=config.sinkhorn_iterations,
                    tol=config.sinkhorn_tol,
                ),
                row_temperature=config.row_temperature,
                differentiable_plan=config.differentiable_plan,
                logit_scale=config.logit_scale,
                logit_bias_init=config.logit_bias_init,
            )
        else:
            self.logit_bias = nn.Parameter(torch.full((1,), float(config.logit_bias_init)))
        if use_gate:
            self.gate = ConditionGate(dim, n, rank=config.gate_rank, generator=generator)

    @property
    def num_conditions(self) -> int:
        return len(self.conditions)

    def text_features(self) -> Tensor:
        """Condition-class prompt features (N, C, D)."""
        n, c = self.num_conditions, self.num_classes
        if self.use_prompts:
            return self.prompts().view(n, c, -1)
        return self.fixed_text.unsqueeze(0).expand(n, c, -1)

    def _adapted(self, patch_features: Tensor) -> Tensor:
        if self.use_adapters:
            out: Tensor = self.adapters(patch_features)  # (B, N, M, D)
            return out
        return patch_features.unsqueeze(1).expand(-1, self.num_conditions, -1, -1)

    def condition_logits(self, patch_features: Tensor, text: Tensor, plans: Tensor | None = None) -> Tensor:
        """Per-condition class logits (B, N, C); ``plans`` (B, N, M, C) from :meth:`transport_plans` if given."""
        x = self._adapted(patch_features)
        if self.use_transport:
            out: Tensor = self.transport(x, text, plan=plans).logits
            return out
        psi = region_pool(region_similarity(x, text), self.config.row_temperature)  # (B, N, C)
        return self.config.logit_scale * psi + self.logit_bias

    def condition_weights(self, global_features: Tensor) -> Tensor:
        """Gate weights (B, N): learned, or uniform without the gate."""
        if self.use_gate:
            out: Tensor = self.gate(global_features)
            return out
        b = global_features.shape[0]
        return global_features.new_full((b, self.num_conditions), 1.0 / self.num_conditions)

    def transport_plans(self, global_features: Tensor, patch_features: Tensor, text: Tensor) -> Tensor | None:
        if not self.use_transport or self.transport.differentiable_plan:
            return None
        with torch.no_grad():
            return self.transport.solve_plan(self._adapted(patch_features), text)

    def logits(
        self, global_features: Tensor, patch_features: Tensor, text: Tensor, plans: Tensor | None = None
    ) -> Tensor:
        per_condition = self.condition_logits(patch_features, text, plans)  # (B, N, C)
        return combine_conditions(self.condition_weights(global_features), per_condition)


def _factory(variant: str) -> MethodFactory:
    prompts, adapters, transport, gate = VARIANTS[variant]

    def build(backbone: Backbone, classnames: Sequence[str], conditions: Sequence[str], config: MethodConfig) -> Method:
        return FedMPT(
            backbone,
            classnames,
            conditions,
            config,
            use_prompts=prompts,
            use_adapters=adapters,
            use_transport=transport,
            use_gate=gate,
        )

    return build


for _variant in VARIANTS:
    register_method(_variant)(_factory(_variant))
