"""Exact per-sample gradients of every trainable parameter of a method, with ``torch.func``.

Why not Opacus's hooks. Opacus infers per-sample gradients layer by layer from each layer's *input*
activations. A prompt vector is shared by the whole batch and reaches the loss through the frozen text
encoder, so there is no batch-first input to read: Opacus either fails (a module with no input) or, for a
prompt module fed a class-indexed tensor, silently builds per-*class* "per-sample" gradients and still
reports epsilon (research notes, privacy_anchors.md sections 0.5 and 2.4). Here every per-sample gradient is
computed by one uniform, exact ``torch.func`` path instead, and handed to Opacus's ``DPOptimizer`` only for
clipping and noise (:mod:`privacy.dpsgd`).

The math. A method computes text features ``T = f(theta_text)`` once per step from its prompt parameters
(``f`` = prompt splice + frozen text encoder; ``T`` does not depend on the data) and the per-sample loss

    L_i = loss(logits(global_i, patches_i, T; theta_other), y_i)

with ``theta_other`` the adapters, gate, biases. Then, exactly,

    dL_i/dtheta_other = vmap_i grad(L_i)                        (B, *theta_other.shape)
    G_i              = dL_i/dT  = vmap_i grad(L_i) w.r.t. T      (B, *T.shape)   the text cotangents
    dL_i/dtheta_text = J_f(theta_text)^T G_i = vmap_i vjp_f(G_i) (B, *theta_text.shape)

The last line is ``B`` vector-Jacobian products through the frozen text encoder (vectorised with ``vmap``,
chunked to bound memory): the cost of the *exact* mode. The *feature-space* mode of :mod:`privacy.dpsgd`
stops at ``G_i`` and applies the single vjp after the noise.

Assumptions (checked by :func:`check_dp_compatible`): no loss or layer couples the samples of a batch; the
text features depend on the prompt parameters only and the logits depend on the prompt parameters only
through ``T``; every module is in a deterministic mode (the frozen backbone in eval mode, no train-mode
dropout or batch statistics). A transport layer's plan is detached by default: it is solved once per batch
*outside* ``vmap`` (:meth:`Method.transport_plans`, per-problem early stopping, so each row's plan depends on
that row only) and handed into the per-sample computation as data, through which no gradient flows, exactly as
in non-private training. Only a differentiable plan is solved inside ``vmap``, and then with a fixed number of
iterations (data-dependent early stopping cannot run under ``vmap``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedmpt.methods.base import Method
from fedmpt.model.adapters import ConditionAdapters
from fedmpt.model.asymmetric_loss import asymmetric_loss
from fedmpt.model.gate import ConditionGate
from fedmpt.model.prompts import PromptBank
from fedmpt.model.sinkhorn import ConditionTransport
from fedmpt.training import TrainConfig
from privacy.errors import DPIncompatibleError

__all__ = [
    "DPIncompatibleError",
    "ParameterSplit",
    "PerSampleGradients",
    "check_dp_compatible",
    "per_class_prompt_gradients",
    "per_sample_gradients",
    "prepare_for_dp",
    "split_parameters",
]

logger = logging.getLogger(__name__)

#: Modules whose trainable parameters have exact per-sample gradients by the torch.func path: each output row
#: depends on its own input row only (or, for prompt banks, on no data at all).
_KNOWN_OWNERS: tuple[type[nn.Module], ...] = (
    PromptBank,
    ConditionAdapters,
    ConditionTransport,
    ConditionGate,
    nn.Linear,
)

#: Layer types that mix the samples of a batch in training mode (batch statistics) or are random.
_BATCH_COUPLED: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_RANDOM: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd,)


@dataclass(frozen=True)
class ParameterSplit:
    """Names of a method's trainable parameters: prompt parameters (reach the loss through ``T``) and the rest."""

    text: tuple[str, ...]
    other: tuple[str, ...]


def split_parameters(method: Method) -> ParameterSplit:
    """Split ``method.trainable_parameters()`` into prompt-bank parameters and the others (sorted names)."""
    text: set[str] = set()
    for module_name, module in method.named_modules():
        if isinstance(module, PromptBank):
            prefix = f"{module_name}." if module_name else ""
            text.update(prefix + n for n, p in module.named_parameters() if p.requires_grad)
    names = method.trainable_parameters()
    return ParameterSplit(text=tuple(sorted(text)), other=tuple(sorted(set(names) - text)))


def prepare_for_dp(method: Method) -> Method:
    """Switch ``method`` to settings that ``vmap`` and check it (:func:`check_dp_compatible`); returns it.

    The only change: a :class:`ConditionTransport` with a differentiable plan (whose Sinkhorn iterations run
    inside ``vmap``) solves with ``fixed_iterations=True`` (exactly ``max_iter`` iterations, no data-dependent
    early stop). Detached plans are solved outside ``vmap`` and keep early stopping.
    """
    for module in method.modules():
        if (
            isinstance(module, ConditionTransport)
            and module.differentiable_plan
            and not module.sinkhorn.fixed_iterations
        ):
            module.sinkhorn = replace(module.sinkhorn, fixed_iterations=True)
            logger.debug("DP: %s now runs Sinkhorn with fixed_iterations=True", type(module).__name__)
    check_dp_compatible(method)
    return method


def _owner(method: Method, name: str) -> nn.Module:
    module_name, _, _ = name.rpartition(".")
    return method.get_submodule(module_name) if module_name else method


def check_dp_compatible(method: Method, *, probe_rows: int = 2) -> None:
    """Refuse a method whose per-sample gradients cannot be guaranteed exact; raise :class:`DPIncompatibleError`.

    Structural checks: the frozen backbone has no trainable parameter and no module of it is in train mode;
    no module of the method is a batch-coupled layer (BatchNorm, InstanceNorm) or a dropout layer in train
    mode; every trainable parameter belongs to a known module type (prompt bank, adapters, transport, gate,
    ``nn.Linear``, or the method itself); a transport with a differentiable plan runs Sinkhorn with fixed
    iterations. Numerical
    checks at the current parameters (a dependence whose gradient happens to vanish there is not seen), one
    text-encoder pass: ``T = text_features()`` depends on no non-prompt parameter, and the logits
    depend on prompt parameters only through ``T``; and a probe on ``probe_rows`` random rows: the logits of
    the batch equal the per-row logits computed under ``vmap`` (no sample coupling, and ``vmap``-able).
    """
    if not isinstance(method, Method):
        raise DPIncompatibleError(f"DP-SGD needs a fedmpt Method, got {type(method).__name__}")
    backbone = method.backbone
    frozen_trainable = [n for n, p in backbone.clip.named_parameters() if p.requires_grad]
    if frozen_trainable:
        raise DPIncompatibleError(f"the backbone must be frozen; trainable backbone parameters: {frozen_trainable[:3]}")
    in_train = [n or "<backbone>" for n, m in backbone.clip.named_modules() if m.training]
    if in_train:
        raise DPIncompatibleError(f"backbone modules must be in eval mode; in train mode: {in_train[:3]}")
    for name, module in method.named_modules():
        if isinstance(module, _BATCH_COUPLED):
            raise DPIncompatibleError(
                f"module {name!r} ({type(module).__name__}) couples the samples of a batch; per-sample gradients "
                "would not bound one record's influence"
            )
        if isinstance(module, _RANDOM) and module.training and getattr(module, "p", 0.0) > 0:
            raise DPIncompatibleError(f"module {name!r} is dropout in train mode; call method.eval() or remove it")
        if (
            isinstance(module, ConditionTransport)
            and module.differentiable_plan
            and not module.sinkhorn.fixed_iterations
        ):
            raise DPIncompatibleError(
                f"module {name!r} differentiates through Sinkhorn with data-dependent early stopping "
                "(fixed_iterations=False), which cannot run under torch.func.vmap; call "
                "privacy.per_sample.prepare_for_dp(method) first"
            )
    params = method.trainable_parameters()
    if not params:
        return
    for name in params:
        owner = _owner(method, name)
        if not (owner is method or isinstance(owner, _KNOWN_OWNERS)):
            raise DPIncompatibleError(
                f"trainable parameter {name!r} belongs to {type(owner).__name__}, whose per-sample gradients are "
                f"not known to be exact; known owners: {[t.__name__ for t in _KNOWN_OWNERS]} and the method itself"
            )
    split = split_parameters(method)
    _check_text_dependence(method, split, params, probe_rows)


def _check_text_dependence(method: Method, split: ParameterSplit, params: dict[str, nn.Parameter], rows: int) -> None:
    dim = method.backbone.embed_dim
    generator = torch.Generator().manual_seed(0)
    global_features = torch.randn(rows, dim, generator=generator)
    patch_features = torch.randn(rows, 4, dim, generator=generator)
    with torch.enable_grad():
        text = method.text_features()
        others = [params[n] for n in split.other]
        if text.requires_grad and others:
            grads = torch.autograd.grad(text.sum(), others, allow_unused=True)
            leaking = [n for n, g in zip(split.other, grads, strict=True) if g is not None and bool(g.abs().sum() > 0)]
            if leaking:
                raise DPIncompatibleError(f"text_features() depends on non-prompt parameters {leaking}")
        logits = method.logits(global_features, patch_features, text.detach())
        prompts = [params[n] for n in split.text]
        if prompts and logits.requires_grad:
            grads = torch.autograd.grad(logits.sum(), prompts, allow_unused=True)
            direct = [n for n, g in zip(split.text, grads, strict=True) if g is not None and bool(g.abs().sum() > 0)]
            if direct:
                raise DPIncompatibleError(
                    f"logits() uses prompt parameters {direct} other than through text_features()"
                )
    with torch.no_grad():
        batched = method.logits(global_features, patch_features, text.detach())
        plans = method.transport_plans(global_features, patch_features, text.detach())
        try:
            if plans is None:
                single = vmap(lambda g, p: method.logits(g[None], p[None], text.detach())[0])(
                    global_features, patch_features
                )
            else:
                single = vmap(lambda g, p, q: method.logits(g[None], p[None], text.detach(), q[None])[0])(
                    global_features, patch_features, plans
                )
        except RuntimeError as err:
            raise DPIncompatibleError(f"{method.name}: logits cannot run under torch.func.vmap: {err}") from err
    if not torch.allclose(batched, single, rtol=1e-4, atol=1e-5):
        gap = float((batched - single).abs().max())
        raise DPIncompatibleError(
            f"{method.name}: a sample's logits depend on the other samples of its batch (max gap {gap:.3g})"
        )


class _Calls(nn.Module):
    """Wraps a method so that ``functional_call`` can reach ``text_features`` and ``logits`` with swapped params."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, kind: str, *args: Tensor) -> Tensor:
        if kind == "text":
            return self.method.text_features()
        return self.method.logits(*args)


def _prefixed(values: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {f"method.{k}": v for k, v in values.items()}


@dataclass
class PerSampleGradients:
    """Per-sample quantities of one batch of ``B`` rows (see the module docstring for the math).

    Attributes:
        losses: ``(B,)`` per-sample losses.
        other: per-sample gradients ``(B, *shape)`` of every non-prompt trainable parameter, by name.
        text: the text features ``T`` of this step (detached).
        text_cotangents: ``G = dL_i/dT``, ``(B, *T.shape)``.
        text_vjp: maps a cotangent on ``T`` (``T.shape``) to the gradients of the prompt parameters, by name.
        text_names: names of the prompt parameters (keys of ``text_vjp``'s output).
    """

    losses: Tensor
    other: dict[str, Tensor]
    text: Tensor
    text_cotangents: Tensor
    text_vjp: Callable[[Tensor], dict[str, Tensor]]
    text_names: tuple[str, ...]

    @property
    def batch_size(self) -> int:
        return int(self.losses.shape[0])

    def prompt_gradients(self, chunk_size: int | None = 8) -> dict[str, Tensor]:
        """Exact per-sample prompt gradients ``J_f^T G_i``, ``(B, *shape)`` by name (``chunk_size`` vjps at once).

        The vjps run with the math attention kernel, whose backward has a ``vmap`` batching rule (the fused CPU
        kernel's backward does not and would fall back to a slow loop).
        """
        if not self.text_names:
            return {}
        if self.batch_size == 0:
            return {n: g.new_zeros((0, *g.shape)) for n, g in self.text_vjp(torch.zeros_like(self.text)).items()}
        with sdpa_kernel(SDPBackend.MATH):
            out: dict[str, Tensor] = vmap(self.text_vjp, chunk_size=chunk_size)(self.text_cotangents)
        return out


def _targets(labels: np.ndarray | Tensor) -> Tensor:
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    valid = (targets == 1) | (targets == 0) | (targets == -1)
    if not bool(valid.all()):
        bad = targets[~valid].flatten()[:5].tolist()
        raise ValueError(f"labels must be 1, 0 or -1 (unknown), found {bad}")
    return targets


def per_sample_gradients(
    method: Method,
    global_features: Tensor,
    patch_features: Tensor,
    labels: np.ndarray | Tensor,
    train_config: TrainConfig,
) -> PerSampleGradients:
    """Exact per-sample losses, non-prompt gradients and text cotangents of one batch, plus the text vjp.

    ``method`` must pass :func:`check_dp_compatible` (call :func:`prepare_for_dp` once). The loss is the
    per-sample asymmetric loss with ``train_config``'s ``gamma_pos``, ``gamma_neg`` and ``clip``, as in
    :func:`fedmpt.training.batch_loss`; labels are validated once here (the in-``vmap`` check is off).
    Cost: one text-encoder forward (kept for the vjp), one batched solve of the detached transport plans
    (:meth:`Method.transport_plans`) and one ``vmap``-ed forward/backward of the logits.
    """
    targets = _targets(labels)
    batch = global_features.shape[0]
    if patch_features.shape[0] != batch or targets.shape[0] != batch:
        raise ValueError(
            f"rows disagree: global {tuple(global_features.shape)}, patches {tuple(patch_features.shape)}, "
            f"labels {tuple(targets.shape)}"
        )
    split = split_parameters(method)
    params = method.trainable_parameters()
    calls = _Calls(method)
    text_params = {n: params[n].detach() for n in split.text}
    other_params = {n: params[n].detach() for n in split.other}

    def text_fn(values: dict[str, Tensor]) -> Tensor:
        out: Tensor = functional_call(calls, _prefixed(values), ("text",))
        return out

    if text_params:
        with sdpa_kernel(SDPBackend.MATH):  # a backward with a vmap batching rule (see prompt_gradients)
            text, raw_vjp = vjp(text_fn, text_params)[:2]

        def text_vjp(cotangent: Tensor) -> dict[str, Tensor]:
            (grads,) = raw_vjp(cotangent)
            result: dict[str, Tensor] = grads
            return result
    else:
        with torch.no_grad():
            text = method.text_features()

        def text_vjp(cotangent: Tensor) -> dict[str, Tensor]:
            return {}

    text = text.detach()
    gamma_pos, gamma_neg, clip = train_config.gamma_pos, train_config.gamma_neg, train_config.clip

    plans = method.transport_plans(global_features, patch_features, text) if batch else None

    def sample_loss(others: dict[str, Tensor], t: Tensor, g: Tensor, p: Tensor, y: Tensor, *plan: Tensor) -> Tensor:
        args = (g[None], p[None], t, *(q[None] for q in plan))
        logits = functional_call(calls, _prefixed(others), ("logits", *args))
        return asymmetric_loss(logits, y[None], gamma_pos, gamma_neg, clip, check_targets=False)[0]

    if batch == 0:
        return PerSampleGradients(
            losses=text.new_zeros((0,)),
            other={n: v.new_zeros((0, *v.shape)) for n, v in other_params.items()},
            text=text,
            text_cotangents=text.new_zeros((0, *text.shape)),
            text_vjp=text_vjp,
            text_names=split.text,
        )
    extra = () if plans is None else (plans,)
    per_sample = vmap(grad_and_value(sample_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0, 0) + (0,) * len(extra))
    (other_grads, cotangents), losses = per_sample(other_params, text, global_features, patch_features, targets, *extra)
    return PerSampleGradients(
        losses=losses.detach(),
        other={n: g.detach() for n, g in other_grads.items()},
        text=text,
        text_cotangents=cotangents.detach(),
        text_vjp=text_vjp,
        text_names=split.text,
    )


def per_class_prompt_gradients(grads: PerSampleGradients) -> dict[str, Tensor]:
    """DELIBERATELY WRONG "per-sample" prompt gradients, indexed by prompt (class), for audits only.

    Reproduces what Opacus's hooks silently build for a prompt module fed a class-indexed input: row ``p`` is
    the batch gradient flowing through prompt ``p``'s text feature, ``J_f^T (sum_i G_i masked to row p)``, shape
    ``(P, *shape)``. The rows sum to the true batch gradient (non-private training looks fine) but one record
    spreads over every row, so clipping rows to ``C`` does not bound its influence by ``C``. The canary audit
    (:mod:`privacy.canary`) must catch it.
    """
    total = grads.text_cotangents.sum(0)  # (*T.shape)
    rows = total.reshape(-1, total.shape[-1])  # (P, D)
    masks = torch.eye(rows.shape[0], dtype=rows.dtype).unsqueeze(-1) * rows.unsqueeze(0)  # (P, P, D)
    with sdpa_kernel(SDPBackend.MATH):
        out: dict[str, Tensor] = vmap(grads.text_vjp, chunk_size=8)(masks.reshape(-1, *total.shape))
    return out
