"""Baselines on the same frozen backbone, data and metrics: zero-shot CLIP, PromptFL and Fed-DualCoOp.

* ``zeroshot``: ``"a photo of a {class}."`` prompts, no training; logits use the backbone's own logit scale
  and bias when it has them (SigLIP-trained models, such as the bundled tiny CLIP), else ``20 cos - 5``.
* ``promptfl`` (Guo et al., PromptFL): CoOp context vectors shared by all classes, scored on the global image
  feature, averaged by FedAvg; the context starts from the embeddings of ``"a photo of"`` (CoOp's
  ``ctx_init``, ``MethodConfig.context_init``) followed by the class with its article, i.e. at the zero-shot
  model. Logits ``20 cos(v, t_c) + beta``
  with a learnable bias (multi-label sigmoid).
* ``dualcoop`` (Sun et al., DualCoOp, federated by FedAvg as Fed-DualCoOp): positive and negative contexts,
  class-specific region aggregation on the patch features with spatial weights from the positive map;
  logits ``20 (psi+_c - psi-_c)``, i.e. the positive probability of DualCoOp's two-way softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedmpt.backbone.loader import Backbone
from fedmpt.methods.base import Method, MethodConfig, register_method
from fedmpt.model.prompts import PromptBank, context_prompts
from fedmpt.model.region_pooling import region_pool, region_similarity
from fedmpt.world.captions import class_prompt


class ZeroShot(Method):
    """Zero-shot CLIP with hand-written prompts; nothing to train."""

    fixed_text: Tensor

    def __init__(self, backbone: Backbone, classnames: Sequence[str], config: MethodConfig) -> None:
        super().__init__(backbone, classnames)
        with torch.no_grad():
            text = backbone.encode_text(backbone.tokenize([class_prompt(c) for c in self.classnames]))
        self.register_buffer("fixed_text", text.detach().clone())
        model = backbone.model
        if getattr(model, "logit_bias", None) is not None:
            self.scale, self.bias = float(model.logit_scale.exp()), float(model.logit_bias)
        else:
            self.scale, self.bias = config.logit_scale, config.logit_bias_init

    def text_features(self) -> Tensor:
        return self.fixed_text

    def logits(
        self, global_features: Tensor, patch_features: Tensor, text: Tensor, plans: Tensor | None = None
    ) -> Tensor:
        cos = F.normalize(global_features, dim=-1) @ F.normalize(text, dim=-1).T
        return self.scale * cos + self.bias


class PromptFL(Method):
    """CoOp prompts on the global image feature (PromptFL)."""

    def __init__(self, backbone: Backbone, classnames: Sequence[str], config: MethodConfig) -> None:
        super().__init__(backbone, classnames)
        generator = torch.Generator().manual_seed(config.init_seed)
        init: dict[str, Tensor] | None = None
        n_context = config.n_context
        class_texts = list(self.classnames)
        if config.context_init:  # CoOp's ctx_init: start at the zero-shot prompt "a photo of {a|an} {class}."
            tokenizer: Any = backbone.tokenizer  # open_clip's BPE tokenizer (PromptBank checks it)
            ids = tokenizer.encode(config.context_init)
            n_context = len(ids)
            with torch.no_grad():
                init = {"context": backbone.token_embedding(torch.tensor(ids, dtype=torch.long)).detach()}
            class_texts = [_after_context(config.context_init, c) for c in self.classnames]
        prompts, groups = context_prompts(class_texts, n_context)
        self.prompts = PromptBank(backbone, prompts, groups, generator=generator, init=init)
        self.logit_scale = config.logit_scale
        self.logit_bias = nn.Parameter(torch.full((1,), float(config.logit_bias_init)))

    def text_features(self) -> Tensor:
        out: Tensor = self.prompts()
        return out

    def logits(
        self, global_features: Tensor, patch_features: Tensor, text: Tensor, plans: Tensor | None = None
    ) -> Tensor:
        cos = F.normalize(global_features, dim=-1) @ F.normalize(text, dim=-1).T
        return self.logit_scale * cos + self.logit_bias


def _after_context(context: str, classname: str) -> str:
    """What follows ``context`` in the zero-shot prompt of ``classname`` (``"an apple"`` after ``"a photo of"``),
    so that context + class text is the zero-shot prompt word for word; the class name if it does not start so."""
    prompt = class_prompt(classname).removesuffix(".")
    prefix = context.strip() + " "
    return prompt[len(prefix) :] if prompt.startswith(prefix) else classname


class DualCoOp(Method):
    """Positive and negative prompts with class-specific region aggregation (Fed-DualCoOp)."""

    def __init__(self, backbone: Backbone, classnames: Sequence[str], config: MethodConfig) -> None:
        super().__init__(backbone, classnames)
        generator = torch.Generator().manual_seed(config.init_seed)
        positive, pos_groups = context_prompts(self.classnames, config.n_context, group="positive_context")
        negative, neg_groups = context_prompts(self.classnames, config.n_context, group="negative_context")
        self.prompts = PromptBank(backbone, positive + negative, {**pos_groups, **neg_groups}, generator=generator)
        self.logit_scale = config.logit_scale
        self.temperature = config.row_temperature

    def text_features(self) -> Tensor:
        return self.prompts().view(2, self.num_classes, -1)  # (2, C, D): positive, negative

    def logits(
        self, global_features: Tensor, patch_features: Tensor, text: Tensor, plans: Tensor | None = None
    ) -> Tensor:
        positive = region_similarity(patch_features, text[0])  # (B, M, C)
        negative = region_similarity(patch_features, text[1])
        psi_pos = region_pool(positive, self.temperature)
        psi_neg = region_pool(negative, self.temperature, weights_from=positive)
        return self.logit_scale * (psi_pos - psi_neg)


@register_method("zeroshot")
def _zeroshot(backbone: Backbone, classnames: Sequence[str], conditions: Sequence[str], config: MethodConfig) -> Method:
    return ZeroShot(backbone, classnames, config)


@register_method("promptfl")
def _promptfl(backbone: Backbone, classnames: Sequence[str], conditions: Sequence[str], config: MethodConfig) -> Method:
    return PromptFL(backbone, classnames, config)


@register_method("dualcoop")
def _dualcoop(backbone: Backbone, classnames: Sequence[str], conditions: Sequence[str], config: MethodConfig) -> Method:
    return DualCoOp(backbone, classnames, config)
